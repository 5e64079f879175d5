"""Cut each node's program into stages and run the stages in Python.

A stage ends where the node must wait for a message (the next op reads a
payload not yet received) and right after it has produced messages to send,
so sends leave as early as possible. Each stage becomes its own fx
GraphModule; its inputs are model inputs, received payloads, or values carried
from the node's earlier stages, and its outputs are payloads to send, values
carried forward, and (on node 0) model outputs. Size computations (non-tensor
values) are recomputed in each stage that uses them instead of being carried;
the tensors they read (x in x.shape) are carried to that stage.

`run_python` executes all nodes' stages with messages passed through a dict:
the reference for the ONNX export (verification link 2 of the design).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..artifact.schedule import Message, Stage, StageInput, StageOutput
from .program import Lowered, NodeProgram, model_output, recv, send


@dataclass
class StageModule:
    stage: Stage
    module: fx.GraphModule
    example_inputs: list[torch.Tensor]


def _is(node: fx.Node, marker) -> bool:
    return node.op == "call_function" and node.target is marker


def _assign_stages(prog: NodeProgram) -> dict[fx.Node, int]:
    stage_of: dict[fx.Node, int] = {}
    stage, busy, sent = 0, False, False
    for node in prog.graph.nodes:
        if node.op in ("get_attr", "output") or _is(node, recv):
            continue  # placed with their first user
        marker = _is(node, send) or _is(node, model_output)
        waits = [a for a in node.all_input_nodes if _is(a, recv) and a not in stage_of]
        if busy and (waits or (sent and not marker)):  # a marker forwarding a payload waits for it too
            stage, busy, sent = stage + 1, False, False
        for a in waits:
            stage_of[a] = stage
        stage_of[node] = stage
        sent = sent or _is(node, send)
        busy = True
    for node in prog.graph.nodes:  # payloads forwarded without compute: received where they are sent
        if _is(node, recv) and node not in stage_of:
            stage_of[node] = min(stage_of[u] for u in node.users)
    return stage_of


def _structural(prog: NodeProgram, node: fx.Node) -> bool:
    return node.op != "placeholder" and node.name not in prog.shapes and not any(
        _is(node, m) for m in (recv, send, model_output))


def cut(prog: NodeProgram) -> list[StageModule]:
    stage_of = _assign_stages(prog)
    count = max(stage_of.values(), default=-1) + 1
    last_use: dict[fx.Node, int] = {}

    def use(a: fx.Node, s: int) -> None:
        if last_use.get(a, -1) >= s:
            return  # and so are its inputs, if it is structural
        last_use[a] = s
        if _structural(prog, a):  # recomputed in stage s (e.g. x.shape for a final resize): so are its inputs
            for b in a.all_input_nodes:
                use(b, s)

    for node, s in stage_of.items():
        for a in node.all_input_nodes:
            use(a, s)
    return [_StageCut(prog, s, stage_of, last_use).module() for s in range(count)]


class _StageCut:
    """Stage s of one node's program as a graph of its own."""

    def __init__(self, prog: NodeProgram, s: int, stage_of: dict[fx.Node, int], last_use: dict[fx.Node, int]):
        self.prog, self.s, self.stage_of, self.last_use = prog, s, stage_of, last_use
        self.g = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.stage = Stage(index=s, file=f"node{prog.node}/stage{s:03d}.onnx")
        self.placeholders: list[fx.Node] = []
        self.examples: list[torch.Tensor] = []

    def placeholder(self, node: fx.Node, name: str, source: str, ref: str) -> fx.Node:
        p = self.g.placeholder(name.replace(".", "_"))  # the ONNX input keeps `name`
        self.placeholders.append(p)
        self.stage.inputs.append(StageInput(name, source, ref))
        self.examples.append(torch.zeros(self.prog.shapes[node.name], dtype=self.prog.dtypes[node.name]))
        return p

    def get(self, a: fx.Node) -> fx.Node:
        if a in self.env:
            return self.env[a]
        here = self.stage_of.get(a) == self.s
        if a.op == "get_attr":
            self.env[a] = self.g.get_attr(a.target)
        elif _structural(self.prog, a):
            self.env[a] = self.g.node_copy(a, self.get)
        elif here and _is(a, recv):
            self.env[a] = self.placeholder(a, a.args[0], "message", a.args[0])
        elif here and a.op == "placeholder":
            self.env[a] = self.placeholder(a, a.target, "model_input", a.target)
        else:
            self.env[a] = self.placeholder(a, f"carry.{a.name}", "carried", a.name)
        return self.env[a]

    def module(self) -> StageModule:
        outputs = []
        for node in self.prog.graph.nodes:
            if self.stage_of.get(node) != self.s:
                continue
            if _is(node, send):
                outputs.append((StageOutput(node.args[0], "message", node.args[0]), self.get(node.args[1])))
            elif _is(node, model_output):
                outputs.append((StageOutput(node.args[0], "model_output", node.args[0]), self.get(node.args[1])))
            elif _is(node, recv) or node.op == "placeholder":
                self.get(node)
            elif not _structural(self.prog, node):  # sizes: copied where a stage uses them (get)
                self.env[node] = self.g.node_copy(node, self.get)
        for node, value in self.env.items():
            if self.stage_of.get(node) == self.s and self.last_use.get(node, -1) > self.s \
                    and not _structural(self.prog, node) and node.op != "get_attr":
                outputs.append((StageOutput(f"carry.{node.name}", "carried", node.name), value))
        first = next((n for n in self.g.nodes if n.op != "placeholder"), None)
        if first is not None:
            for p in self.placeholders:
                first.prepend(p)
        self.stage.outputs = [o for o, _ in outputs]
        self.g.output(tuple(v for _, v in outputs))
        gm = fx.GraphModule(self.prog.root, self.g, f"node{self.prog.node}_stage{self.s}")
        return StageModule(self.stage, gm, self.examples)


def cut_all(lowered: Lowered) -> list[list[StageModule]]:
    return [cut(prog) for prog in lowered.programs]


def staged(messages: list[Message], programs: list[list[StageModule]]) -> list[Message]:
    """The messages with the stage that sends each (on its source node) and the stage that receives it."""
    sent, received = {}, {}
    for prog in programs:
        for sm in prog:
            sent.update((o.ref, sm.stage.index) for o in sm.stage.outputs if o.role == "message")
            received.update((i.ref, sm.stage.index) for i in sm.stage.inputs if i.source == "message")
    return [dataclasses.replace(m, src_stage=sent[m.id], dst_stage=received[m.id]) for m in messages]


def run_python(programs: list[list[StageModule]], lowered: Lowered, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run every node's stages, passing messages through a dict (single thread, any ready node first)."""
    names = [name for name, _, _ in lowered.inputs]
    model_inputs = dict(zip(names, inputs, strict=False))
    messages: dict[str, torch.Tensor] = {}
    carried = [dict() for _ in programs]
    outputs: dict[str, torch.Tensor] = {}
    next_stage = [0] * len(programs)
    with torch.no_grad():
        while any(k < len(p) for k, p in zip(next_stage, programs, strict=False)):
            progressed = False
            for j, prog in enumerate(programs):
                if next_stage[j] >= len(prog):
                    continue
                sm = prog[next_stage[j]]
                if any(i.source == "message" and i.ref not in messages for i in sm.stage.inputs):
                    continue
                args = [model_inputs[i.ref] if i.source == "model_input" else
                        messages[i.ref] if i.source == "message" else carried[j][i.ref] for i in sm.stage.inputs]
                for o, v in zip(sm.stage.outputs, sm.module(*args), strict=False):
                    if o.role == "message":
                        messages[o.ref] = v
                    elif o.role == "carried":
                        carried[j][o.ref] = v
                    else:
                        outputs[o.ref] = v
                next_stage[j] += 1
                progressed = True
            if not progressed:
                waiting = {j: [i.ref for i in programs[j][next_stage[j]].stage.inputs if i.source == "message"]
                           for j in range(len(programs)) if next_stage[j] < len(programs[j])}
                raise RuntimeError(f"deadlock: nodes wait for messages nobody sends: {waiting}")
    return [outputs[name] for name, _, _ in lowered.outputs]

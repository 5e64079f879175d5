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

from dataclasses import dataclass

import torch
import torch.fx as fx

from .lower import Lowered, NodeProgram, model_output, recv, send
from ..artifact.schedule import Stage, StageInput, StageOutput


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
        if _is(node, send) or _is(node, model_output):
            stage_of[node] = stage
            sent = sent or _is(node, send)
            busy = True
            continue
        waits = [a for a in node.all_input_nodes if _is(a, recv) and a not in stage_of]
        if busy and (sent or waits):
            stage, busy, sent = stage + 1, False, False
        for a in waits:
            stage_of[a] = stage
        stage_of[node] = stage
        busy = True
    for node in prog.graph.nodes:  # payloads forwarded without compute: received where they are sent
        if _is(node, recv) and node not in stage_of:
            stage_of[node] = min(stage_of[u] for u in node.users)
    return stage_of


def _structural(prog: NodeProgram, node: fx.Node) -> bool:
    return node.op != "placeholder" and node.name not in prog.shapes and not any(
        _is(node, m) for m in (recv, send, model_output))


def cut(prog: NodeProgram, lowered: Lowered) -> list[StageModule]:
    stage_of = _assign_stages(prog)
    count = max(stage_of.values(), default=-1) + 1
    by_id = {m.id: m for m in lowered.messages}
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
    stages = []
    for s in range(count):
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        stage = Stage(index=s, file=f"node{prog.node}/stage{s:03d}.onnx")
        placeholders, examples = [], []
        outputs = []

        def placeholder(node: fx.Node, name: str, source: str, ref: str) -> fx.Node:
            p = g.placeholder(name.replace(".", "_"))  # the ONNX input keeps `name`
            placeholders.append(p)
            stage.inputs.append(StageInput(name, source, ref))
            examples.append(torch.zeros(prog.shapes[node.name], dtype=prog.dtypes[node.name]))
            return p

        def get(a: fx.Node) -> fx.Node:
            if a in env:
                return env[a]
            if a.op == "get_attr":
                env[a] = g.get_attr(a.target)
            elif _structural(prog, a):
                env[a] = g.node_copy(a, get)
            elif stage_of.get(a) == s and _is(a, recv):
                env[a] = placeholder(a, a.args[0], "message", a.args[0])
            elif stage_of.get(a) == s and a.op == "placeholder":
                env[a] = placeholder(a, a.target, "model_input", a.target)
            else:
                env[a] = placeholder(a, f"carry.{a.name}", "carried", a.name)
            return env[a]

        for node in prog.graph.nodes:
            if stage_of.get(node) != s:
                continue
            if _is(node, send):
                msg = by_id[node.args[0]]
                msg.src_stage = s
                outputs.append((StageOutput(msg.id, "message", msg.id), get(node.args[1])))
            elif _is(node, model_output):
                outputs.append((StageOutput(node.args[0], "model_output", node.args[0]), get(node.args[1])))
            elif _is(node, recv):
                by_id[node.args[0]].dst_stage = s
                get(node)
            elif node.op == "placeholder":
                get(node)
            else:
                env[node] = g.node_copy(node, get)
        for node, value in env.items():
            if stage_of.get(node) == s and last_use.get(node, -1) > s and not _structural(prog, node) \
                    and node.op != "get_attr":
                outputs.append((StageOutput(f"carry.{node.name}", "carried", node.name), value))
        first = next((n for n in g.nodes if n.op != "placeholder"), None)
        if first is not None:
            for p in placeholders:
                first.prepend(p)
        stage.outputs = [o for o, _ in outputs]
        g.output(tuple(v for _, v in outputs))
        stages.append(StageModule(stage, fx.GraphModule(prog.root, g, f"node{prog.node}_stage{s}"), examples))
    return stages


def cut_all(lowered: Lowered) -> list[list[StageModule]]:
    return [cut(prog, lowered) for prog in lowered.programs]


def run_python(programs: list[list[StageModule]], lowered: Lowered, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run every node's stages, passing messages through a dict (single thread, any ready node first)."""
    names = [name for name, _, _ in lowered.inputs]
    model_inputs = dict(zip(names, inputs))
    messages: dict[str, torch.Tensor] = {}
    carried = [dict() for _ in programs]
    outputs: dict[str, torch.Tensor] = {}
    next_stage = [0] * len(programs)
    with torch.no_grad():
        while any(k < len(p) for k, p in zip(next_stage, programs)):
            progressed = False
            for j, prog in enumerate(programs):
                if next_stage[j] >= len(prog):
                    continue
                sm = prog[next_stage[j]]
                if any(i.source == "message" and i.ref not in messages for i in sm.stage.inputs):
                    continue
                args = [model_inputs[i.ref] if i.source == "model_input" else
                        messages[i.ref] if i.source == "message" else carried[j][i.ref] for i in sm.stage.inputs]
                for o, v in zip(sm.stage.outputs, sm.module(*args)):
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

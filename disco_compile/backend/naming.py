"""Readable stage graphs: ONNX node and value names from the original model's module paths, and metadata.

torch.onnx names the nodes of a stage (a flat fx graph of lowered ops) `/Conv_7`; this pass renames them as
torch.onnx names the nodes of the original model, `/layer1/layer1.0/conv1/Conv` (a suffix `_k` where a name
repeats), and every value computed inside the stage `<node name>_output_<i>`. Graph inputs, outputs and
initializers keep their names: they are the schedule's (message ids, carried values) and the weights'.

Which module an ONNX node belongs to, first that applies:
  1. its torch.onnx scope is a module copied from the original (`/m_layer1_0_bn1/...`: lower.py `m_` names);
  2. it reads a weight or constant lowering made for a layer (`c12_layer1_0_conv1_w`: lower.py `const`);
  3. the module of the node that computed its first input that has one: a value computed earlier in the
     stage, a message (the module whose output the message carries) or a value carried from an earlier stage.
A node none of these name keeps its op type alone (`/Reshape`).

Every stage graph gets `metadata_props` (disco.node, disco.stage, disco.stages, disco.export: the schedule hash
its messages carry, disco.model_hash, disco.settings: manifest.json's settings as JSON) and a `doc_string`
saying where its inputs come from and where its outputs go.
"""
from __future__ import annotations

import json
import re
from collections import Counter

import onnx
import torch.fx as fx

from ..artifact.schedule import Schedule, Stage
from .layers import module_paths

_CONST = re.compile(r"c\d+_(.+?)(_w|_b)?")


def token_paths(gm: fx.GraphModule) -> dict[str, str]:
    """Names lowering derives from the DISCO graph (fx node names, `m_` module copies, constant hints) -> the
    module path in the original model."""
    paths = module_paths(gm)
    tokens = dict(paths)
    for n in gm.graph.nodes:
        if n.op == "call_module":
            tokens[f"m_{str(n.target).replace('.', '_')}"] = str(n.target)
            tokens[f"m_{n.name}"] = paths[n.name]
        elif n.op == "get_attr":
            tokens[str(n.target).replace(".", "_")] = str(n.target)
    return tokens


def _scope_path(node: onnx.NodeProto, tokens: dict[str, str]) -> str | None:
    parts = node.name.split("/")
    return tokens.get(parts[1]) if len(parts) > 2 else None


def _const_path(node: onnx.NodeProto, initializers: set[str], tokens: dict[str, str]) -> str | None:
    for name in node.input:
        match = _CONST.fullmatch(name) if name in initializers else None
        if match and match.group(1) in tokens:
            return tokens[match.group(1)]
    return None


def onnx_name(path: str | None, op_type: str) -> str:
    """torch.onnx's node name for an op of module `path`: "layer1.0.conv1", "Conv" -> /layer1/layer1.0/conv1/Conv."""
    if not path:
        return f"/{op_type}"
    parts = path.split(".")
    return "/" + "/".join([".".join(parts[:i + 1]) for i in range(len(parts) - 1)] + [parts[-1], op_type])


def rename(graph: onnx.GraphProto, tokens: dict[str, str], known: dict[str, str]) -> None:
    """Rename `graph`'s nodes and inner values (module docstring). `known`: value name -> module path of the
    graph's inputs (messages, carried values); the module paths of the graph's outputs are added to it."""
    initializers = {t.name for t in graph.initializer}
    keep = initializers | {v.name for v in graph.input} | {v.name for v in graph.output}
    source = dict(known)
    used: Counter = Counter()
    renamed: dict[str, str] = {}
    for node in graph.node:
        path = (_scope_path(node, tokens) or _const_path(node, initializers, tokens)
                or next((source[i] for i in node.input if i in source), None))
        base = onnx_name(path, node.op_type)
        node.name = base if not used[base] else f"{base}_{used[base]}"
        used[base] += 1
        for k, out in enumerate(node.output):
            if path is not None:
                source[out] = path
            if out and out not in keep:
                renamed[out] = f"{node.name}_output_{k}"
    for node in graph.node:
        node.input[:] = [renamed.get(i, i) for i in node.input]
        node.output[:] = [renamed.get(o, o) for o in node.output]
    for vi in graph.value_info:
        vi.name = renamed.get(vi.name, vi.name)
    known.update({v.name: source[v.name] for v in graph.output if v.name in source})


def _doc(schedule: Schedule, node: int, stage: Stage) -> str:
    messages = {m.id: m for m in schedule.messages}
    came = [f"{i.name} ({'message from node %d' % messages[i.ref].src if i.source == 'message' else i.source})"
            for i in stage.inputs]
    went = [f"{o.name} ({'message to node %d' % messages[o.ref].dst if o.role == 'message' else o.role})"
            for o in stage.outputs]
    last = len(schedule.programs[node]) - 1
    return (f"DISCO node {node}, stage {stage.index} of 0..{last}: runs after stage {stage.index - 1} of this node"
            if stage.index else f"DISCO node {node}, stage 0 of 0..{last}: the node's first stage") + \
        f". Inputs: {', '.join(came) or 'none'}. Outputs: {', '.join(went) or 'none'}. The stages and messages " \
        f"are in schedule.json beside node{node}/."


def annotate(model: onnx.ModelProto, schedule: Schedule, node: int, stage: Stage, export_id: str,
             model_hash: str, settings: dict | None) -> None:
    """Set `model`'s metadata_props and doc_string (module docstring)."""
    props = {"disco.node": str(node), "disco.stage": str(stage.index),
             "disco.stages": str(len(schedule.programs[node])), "disco.export": export_id,
             "disco.model_hash": model_hash, "disco.settings": json.dumps(settings or {}, sort_keys=True)}
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    model.doc_string = model.graph.doc_string = _doc(schedule, node, stage)

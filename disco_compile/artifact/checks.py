"""What makes an export consistent: its schedule against itself, and its stage graphs against its schedule.

`check_schedule` lists every inconsistency of a Schedule (disco_compile/artifact/schedule.py states its
semantics); `check_stage_graphs` checks that every stage graph of an export directory is valid ONNX and
declares the names, dtypes and shapes the schedule says. Both raise BundleError listing what they found;
bundle.py runs them when it writes or reads an export.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import BundleError
from .schedule import (BATCH, FORMAT_VERSION, MESSAGE_KINDS, Message, Schedule, Stage, StageInput, StageOutput,
                       TensorSpec)

if TYPE_CHECKING:
    import onnx  # imported where a stage graph is read: `disco-run info` and --help need no onnx (1.7 s here)

SCHEDULE = "schedule.json"
REEXPORT = "re-export the model"
_SHOWN = 8  # problems listed in one error before "... and N more"


def listing(problems: list[str]) -> str:
    """`problems` one per indented line, the first _SHOWN of them."""
    shown = problems[:_SHOWN]
    more = f"\n  ... and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
    return "".join(f"\n  {p}" for p in shown) + more


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


# ---------------------------------------------------------------- the schedule against itself

def check_schedule(schedule: Schedule) -> None:
    """Raise BundleError listing every inconsistency of `schedule`.

    Checked: node count, unique names and ids; each message goes between two
    different existing nodes, its bytes match its shape and dtype, and it is
    produced by exactly one output of stage `src_stage` of node `src` and
    consumed by exactly one input of stage `dst_stage` of node `dst`; carried
    values are produced once, before they are used, on the node that uses them;
    model inputs and outputs appear on node 0 only, every model output produced
    exactly once; and no stages wait on each other in a cycle.
    """
    problems = _schedule_problems(schedule)
    if not problems:
        problems = _cycle_problems(schedule)
    if problems:
        raise BundleError(f"{SCHEDULE} is inconsistent, the runtime cannot run it; {REEXPORT} (if it "
                          f"happens again, it is a bug in disco-compile's export):{listing(problems)}")


@dataclass(frozen=True)
class _Index:
    """A schedule's messages by id, and its model inputs and outputs by name."""
    messages: dict[str, Message]
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    inputs_on_all_nodes: bool

    @classmethod
    def of(cls, s: Schedule) -> _Index:
        return cls(messages={m.id: m for m in s.messages}, inputs={t.name: t for t in s.inputs},
                   outputs={t.name: t for t in s.outputs}, inputs_on_all_nodes=s.inputs_on_all_nodes)


@dataclass
class _Uses:
    """What the stages refer to, and how often they send and receive each message and produce each model output,
    counted while they are checked."""
    index: _Index
    sent: Counter = field(default_factory=Counter)
    received: Counter = field(default_factory=Counter)
    model_outputs: Counter = field(default_factory=Counter)


def _schedule_problems(s: Schedule) -> list[str]:
    """Every inconsistency of `s` but cycles, in a fixed order: header, duplicates, messages, stages, counts."""
    problems = _header_problems(s) + _duplicate_problems(s)
    for m in s.messages:
        problems += _message_problems(s, m)
    uses = _Uses(_Index.of(s))
    for node, program in enumerate(s.programs):
        problems += _program_problems(uses, node, program)
    return problems + _count_problems(s, uses)


def _header_problems(s: Schedule) -> list[str]:
    problems = []
    if s.format_version != FORMAT_VERSION:
        problems.append(f"format_version {s.format_version}, expected {FORMAT_VERSION}")
    if s.nodes != len(s.programs):
        problems.append(f"nodes is {s.nodes} but there are {len(s.programs)} programs")
    return problems


def _duplicates(names) -> list:
    return sorted(name for name, n in Counter(names).items() if n > 1)


def _duplicate_problems(s: Schedule) -> list[str]:
    problems = []
    for what, names in (("model input", [t.name for t in s.inputs]), ("model output", [t.name for t in s.outputs]),
                        ("message id", [m.id for m in s.messages]),
                        ("stage file", [st.file for p in s.programs for st in p])):
        problems += [f"{what} {name!r} appears more than once" for name in _duplicates(names)]
    return problems


def _message_problems(s: Schedule, m: Message) -> list[str]:
    """A message's kind, its route between the nodes and stages, and its payload."""
    where = f"message {m.id!r}"
    nodes = len(s.programs)
    problems = []
    if m.kind not in MESSAGE_KINDS:
        problems.append(f"{where}: kind {m.kind!r} is not one of {MESSAGE_KINDS}")
    if not (0 <= m.src < nodes and 0 <= m.dst < nodes):
        problems.append(f"{where}: from node {m.src} to node {m.dst}, but the nodes are 0..{nodes - 1}")
        return problems
    if m.src == m.dst:
        problems.append(f"{where}: from node {m.src} to itself (a value kept on one node is 'carried')")
    if m.kind == "input" and m.src != 0:
        problems.append(f"{where}: an 'input' message must come from node 0, not node {m.src}")
    if m.kind == "input" and s.inputs_on_all_nodes:
        problems.append(f"{where}: an 'input' message, but every node takes the model inputs itself "
                        f"(inputs_on_all_nodes)")
    if m.kind == "output" and m.dst != 0:
        problems.append(f"{where}: an 'output' message must go to node 0, not node {m.dst}")
    if not 0 <= m.src_stage < len(s.programs[m.src]):
        problems.append(f"{where}: src_stage {m.src_stage}, but node {m.src} has {len(s.programs[m.src])} stages")
    if not 0 <= m.dst_stage < len(s.programs[m.dst]):
        problems.append(f"{where}: dst_stage {m.dst_stage}, but node {m.dst} has {len(s.programs[m.dst])} stages")
    return problems + _payload_problems(where, m)


def _payload_problems(where: str, m: Message) -> list[str]:
    """A message's shape ("batch", then whole numbers), its dtype, and its bytes per sample."""
    if not m.shape or m.shape[0] != BATCH or not all(isinstance(d, int) for d in m.shape[1:]):
        return [f"{where}: shape {m.shape} must be {BATCH!r} followed by whole numbers"]
    try:
        expected = math.prod(m.shape[1:]) * np.dtype(m.dtype).itemsize
    except TypeError:
        return [f"{where}: dtype {m.dtype!r} is not a numpy dtype name"]
    if m.bytes != expected:
        return [f"{where}: bytes {m.bytes}, but shape {_fmt_shape(m.shape)} of {m.dtype} "
                f"is {expected} bytes per sample"]
    return []


def _program_problems(uses: _Uses, node: int, program: list[Stage]) -> list[str]:
    """Node `node`'s stages in order: their indices, and where each input comes from and each output goes."""
    problems = []
    carried_at: dict[str, int] = {}  # carried value -> stage that produced it
    for position, stage in enumerate(program):
        where = f"node {node} stage {stage.index} ({stage.file})"
        if stage.index != position:
            problems.append(f"{where}: index {stage.index}, but it is stage {position} of node {node}")
        problems += [f"{where}: graph input {name!r} listed more than once"
                     for name in _duplicates(i.name for i in stage.inputs)]
        for inp in stage.inputs:
            problems += _input_problems(uses, where, node, stage, inp, carried_at)
        for out in stage.outputs:
            problems += _output_problems(uses, where, node, stage, out, carried_at)
    return problems


def _input_problems(uses: _Uses, where: str, node: int, stage: Stage, inp: StageInput,
                    carried_at: dict[str, int]) -> list[str]:
    """Whether a stage can have input `inp`; counts the message it receives."""
    if inp.source == "model_input":
        if node != 0 and not uses.index.inputs_on_all_nodes:
            return [f"{where}: model input {inp.ref!r} read on node {node}; only node 0 holds "
                    f"the model inputs (others get them as 'input' messages, unless inputs_on_all_nodes)"]
        if inp.ref not in uses.index.inputs:
            return [f"{where}: reads model input {inp.ref!r}, which is not a model input"]
        return []
    if inp.source == "message":
        return _message_use(uses, where, inp.ref, node, stage, sending=False)
    if inp.source == "carried":
        if inp.ref not in carried_at:
            return [f"{where}: uses carried value {inp.ref!r} before any earlier stage of "
                    f"node {node} produces it"]
        return []
    return [f"{where}: input {inp.name!r} has unknown source {inp.source!r}"]


def _message_use(uses: _Uses, where: str, ref: str, node: int, stage: Stage, *, sending: bool) -> list[str]:
    """Whether stage `stage` of `node` can send (or receive) message `ref`; counts the use."""
    verb = "sends" if sending else "receives"
    m = uses.index.messages.get(ref)
    if m is None:
        return [f"{where}: {verb} message {ref!r}, which is not in the messages"]
    (uses.sent if sending else uses.received)[m.id] += 1
    at = (m.src, m.src_stage) if sending else (m.dst, m.dst_stage)
    if at != (node, stage.index):
        said = "the messages say comes from" if sending else "the messages send to"
        return [f"{where}: {verb} message {m.id!r}, which {said} node {at[0]} stage {at[1]}"]
    return []


def _output_problems(uses: _Uses, where: str, node: int, stage: Stage, out: StageOutput,
                     carried_at: dict[str, int]) -> list[str]:
    """Whether a stage can have output `out`; counts the message it sends or the model output it produces, and
    records the carried value it produces in `carried_at`."""
    if out.role == "message":
        return _message_use(uses, where, out.ref, node, stage, sending=True)
    if out.role == "carried":
        problems = []
        if out.ref in carried_at:
            problems.append(f"{where}: carried value {out.ref!r} is already produced by stage "
                            f"{carried_at[out.ref]} of node {node}")
        carried_at.setdefault(out.ref, stage.index)
        return problems
    if out.role == "model_output":
        uses.model_outputs[out.ref] += 1
        if node != 0:
            return [f"{where}: produces model output {out.ref!r} on node {node}; model "
                    f"outputs are produced on node 0 (others send 'output' messages)"]
        if out.ref not in uses.index.outputs:
            return [f"{where}: produces model output {out.ref!r}, which is not a model output"]
        return []
    return [f"{where}: output {out.name!r} has unknown role {out.role!r}"]


def _count_problems(s: Schedule, uses: _Uses) -> list[str]:
    """Every message sent and received exactly once, every model output produced exactly once."""
    problems = []
    for m in s.messages:
        if uses.sent[m.id] != 1:
            problems.append(f"message {m.id!r}: sent by {uses.sent[m.id]} stage outputs, expected exactly 1")
        if uses.received[m.id] != 1:
            problems.append(f"message {m.id!r}: received by {uses.received[m.id]} stage inputs, expected exactly 1")
    for t in s.outputs:
        if uses.model_outputs[t.name] != 1:
            problems.append(f"model output {t.name!r}: produced {uses.model_outputs[t.name]} times, "
                            f"expected exactly once")
    return problems


def _cycle_problems(s: Schedule) -> list[str]:
    """Stages that can never run: each node runs its stages in order and a stage
    waits for its messages, so (node, stage) pairs form a graph that must be acyclic."""
    unmet: dict[tuple[int, int], int] = {(k, i): int(i > 0) for k, p in enumerate(s.programs) for i in range(len(p))}
    unblocks: dict[tuple[int, int], list[tuple[int, int]]] = {
        (k, i): ([(k, i + 1)] if i + 1 < len(p) else []) for k, p in enumerate(s.programs) for i in range(len(p))}
    for m in s.messages:
        unmet[(m.dst, m.dst_stage)] += 1
        unblocks[(m.src, m.src_stage)].append((m.dst, m.dst_stage))
    ready = [key for key, n in unmet.items() if n == 0]  # Kahn's algorithm: linear in stages and messages
    while ready:
        for after in unblocks[ready.pop()]:
            unmet[after] -= 1
            if unmet[after] == 0:
                ready.append(after)
    stuck = sorted(key for key, n in unmet.items() if n > 0)
    if not stuck:
        return []
    names = ", ".join(f"node {k} stage {i}" for k, i in stuck[:_SHOWN]) + (" ..." if len(stuck) > _SHOWN else "")
    return [f"stages that wait on each other's messages in a cycle (they would deadlock): {names}"]


# ---------------------------------------------------------------- stage graphs against the schedule

_Type = tuple[str | None, list | None]  # (numpy dtype name, shape) a graph declares; None where undeclared


def check_stage_graphs(root: Path, s: Schedule, nodes: tuple[int, ...] | None = None) -> None:
    """Raise BundleError if a stage graph under `root` is not valid ONNX, or listing where the graphs' inputs
    and outputs disagree with `s` in name, dtype or shape (carried values: with the graph that produces them);
    `nodes`: only those nodes' graphs (None: every node's)."""
    index = _Index.of(s)
    problems: list[str] = []
    for node, program in enumerate(s.programs):
        if nodes is not None and node not in nodes:
            continue
        carried: dict[str, _Type] = {}  # value -> type declared by its producer
        for stage in program:
            problems += _stage_graph_problems(root, index, node, stage, carried)
    if problems:
        raise BundleError(f"the stage graphs and {SCHEDULE} disagree; {REEXPORT}:{listing(problems)}")


def _load_graph(root: Path, where: str, stage: Stage) -> onnx.GraphProto:
    """The stage's graph, read without its external data: a tensor stored outside the file is refused, since
    onnxruntime would read it from a path the manifest's hashes do not cover (relative to the working
    directory when the graph is given as bytes)."""
    import onnx
    from onnx import external_data_helper
    try:
        model = onnx.load(str(root / stage.file), load_external_data=False)
    except OSError as exc:
        raise BundleError(f"{where}: cannot be read ({exc.strerror or exc}); check its permissions") from exc
    except Exception as exc:  # onnx raises several types (DecodeError, ValueError, ...)
        raise BundleError(f"{where}: not a valid ONNX model ({type(exc).__name__}: {exc}); {REEXPORT}") from exc
    external = [t.name for t in external_data_helper._get_all_tensors(model)
                if external_data_helper.uses_external_data(t)]
    if external:
        raise BundleError(f"{where}: tensors {', '.join(external[:_SHOWN])} are stored as ONNX external data, "
                          f"outside the files the manifest's sha256 cover; an export holds every weight inside "
                          f"its stage graphs: {REEXPORT}")
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # onnx raises several types (ValidationError, InferenceError, ...)
        raise BundleError(f"{where}: not a valid ONNX model ({type(exc).__name__}: {exc}); {REEXPORT}") from exc
    return model.graph


def _stage_graph_problems(root: Path, index: _Index, node: int, stage: Stage,
                          carried: dict[str, _Type]) -> list[str]:
    """One stage's graph against the schedule; records the types of the carried values it produces."""
    where = f"{stage.file} (node {node} stage {stage.index})"
    graph = _load_graph(root, where, stage)
    initialized = {t.name for t in graph.initializer}
    graph_inputs = {vi.name: vi for vi in graph.input if vi.name not in initialized}
    graph_outputs = {vi.name: vi for vi in graph.output}
    problems = []
    for what, graph_names, declared in (("inputs", graph_inputs, {i.name for i in stage.inputs}),
                                        ("outputs", graph_outputs, {o.name for o in stage.outputs})):
        if set(graph_names) != declared:
            problems.append(f"{where}: graph {what} {sorted(graph_names)}, but {SCHEDULE} declares "
                            f"{sorted(declared)} (not in the graph: {sorted(declared - set(graph_names))}; "
                            f"not in {SCHEDULE}: {sorted(set(graph_names) - declared)})")
    for inp in stage.inputs:
        if inp.name in graph_inputs:
            found = _graph_input_problems(index, inp, _declared_type(graph_inputs[inp.name]), carried)
            problems += [f"{where}: {p}" for p in found]
    for out in stage.outputs:
        if out.name in graph_outputs:
            found = _graph_output_problems(index, out, _declared_type(graph_outputs[out.name]), carried)
            problems += [f"{where}: {p}" for p in found]
    return problems


def _graph_input_problems(index: _Index, inp: StageInput, declared: _Type, carried: dict[str, _Type]) -> list[str]:
    """How the type a graph declares for input `inp` disagrees with what feeds it."""
    if inp.source == "message":
        m = index.messages[inp.ref]
        found = _type_problems(declared, m.dtype, m.shape)
        what = f"message {m.id!r} received as graph input {inp.name!r}"
    elif inp.source == "model_input":
        t = index.inputs[inp.ref]
        found = _type_problems(declared, t.dtype, t.shape)
        what = f"model input {t.name!r} read as graph input {inp.name!r}"
    else:
        found = _carried_problems(carried.get(inp.ref), declared)
        what = f"carried value {inp.ref!r} read as graph input {inp.name!r}"
    return [f"{what}: {p}" for p in found]


def _graph_output_problems(index: _Index, out: StageOutput, declared: _Type,
                           carried: dict[str, _Type]) -> list[str]:
    """How the type a graph declares for output `out` disagrees with the schedule; a carried value's type is
    recorded in `carried`, for the stages that read it."""
    if out.role == "message":
        m = index.messages[out.ref]
        return [f"message {m.id!r} sent from graph output {out.name!r}: {p}"
                for p in _type_problems(declared, m.dtype, m.shape)]
    if out.role == "model_output":
        t = index.outputs[out.ref]
        return [f"model output {t.name!r} from graph output {out.name!r}: {p}"
                for p in _type_problems(declared, t.dtype, t.shape)]
    carried[out.ref] = declared
    return []


def _declared_type(value_info) -> _Type:
    """(numpy dtype name, shape: ints for fixed dims, names for symbolic ones); None where undeclared."""
    import onnx
    if not value_info.type.HasField("tensor_type"):
        return "(not a tensor)", None
    tensor = value_info.type.tensor_type
    dtype = None
    if tensor.elem_type:
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name
        except (KeyError, TypeError, ValueError):
            dtype = onnx.TensorProto.DataType.Name(tensor.elem_type).lower()
    shape = None
    if tensor.HasField("shape"):
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
    return dtype, shape


def _type_problems(declared: _Type, dtype: str, shape: list) -> list[str]:
    """How a graph's declared (dtype, shape) disagrees with the schedule's (dtype, shape with "batch")."""
    graph_dtype, graph_shape = declared
    problems = []
    if graph_dtype is not None and graph_dtype != dtype:
        problems.append(f"dtype {graph_dtype} in the graph, {dtype} in {SCHEDULE}")
    if graph_shape is not None:
        shown = _fmt_shape(graph_shape)
        if len(graph_shape) != len(shape):
            problems.append(f"shape {shown} in the graph, {_fmt_shape(shape)} in {SCHEDULE}")
        elif graph_shape and isinstance(graph_shape[0], int):
            problems.append(f"the graph fixes the batch dimension to {graph_shape[0]} (shape {shown}); "
                            f"{SCHEDULE} says any batch: export the graph with a symbolic batch dimension")
        elif any(isinstance(g, int) and g != d for g, d in zip(graph_shape[1:], shape[1:], strict=True)):
            problems.append(f"shape {shown} in the graph, {_fmt_shape(shape)} in {SCHEDULE}")
    return problems


def _carried_problems(produced: _Type | None, consumed: _Type) -> list[str]:
    """A carried value's type as its producing stage declares it against its consuming stage."""
    if produced is None:
        return []
    (d1, s1), (d2, s2) = produced, consumed
    problems = []
    if d1 is not None and d2 is not None and d1 != d2:
        problems.append(f"dtype {d1} where it is produced, {d2} where it is used")
    if s1 is not None and s2 is not None and (
            len(s1) != len(s2) or any(isinstance(a, int) and isinstance(b, int) and a != b
                                      for a, b in zip(s1, s2, strict=True))):
        problems.append(f"shape {_fmt_shape(s1)} where it is produced, {_fmt_shape(s2)} where it is used")
    return problems

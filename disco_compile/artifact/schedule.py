"""The exported program's contract: which stage graphs each node runs, in what
order, and every message the nodes send each other. Written to OUT/schedule.json
(with OUT/manifest.json holding the sha256 of every file) and checked against
the JSON Schemas in disco_compile/artifact/schemas/ when loaded.

Semantics. Node k runs its stages in order. A stage is one ONNX graph. Each of
its inputs comes from one source:
  - "model_input": the model's input `ref` (node 0 only, other nodes getting it
    as an "input" message; on every node when `inputs_on_all_nodes`: each device
    has its own, e.g. its camera, and no "input" message travels),
  - "message": message `ref`, received from another node,
  - "carried": the output `ref` of one of this node's earlier stages.
Each of its outputs has one role:
  - "message": sent at once as message `ref` to that message's `dst`,
  - "carried": kept for a later stage of this node,
  - "model_output": the model output `ref` (node 0 only).
Every tensor has a batch dimension first; shapes in the schedule write it as
"batch". A message's `channels` are the unit indices (positions in the flattened
channel layout of `tensor`) it carries, in payload order; `bytes` is per sample.
A message's `wire` says how its values are written (artifact/wire.py): as computed
("fp32"), as half floats, or as integers with per-channel scales that the sending
and receiving stage graphs hold (int4 two a byte); `dtype`, `shape` and `bytes`
are the payload's as it travels.

One graph output may be listed by several StageOutputs (e.g. the same slice sent
to two nodes as two messages, or sent and also carried); a graph input has
exactly one source. `from_json` reads back what `to_json` wrote.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

FORMAT_VERSION = 1
BATCH = "batch"

MESSAGE_KINDS = ("input", "exchange", "gather", "stats", "output")


@dataclass
class Message:
    id: str
    src: int
    dst: int
    kind: str  # one of MESSAGE_KINDS
    tensor: str  # name of the tensor in the DISCO graph the payload is taken from
    channels: list[int]
    shape: list[int | str]  # payload shape, "batch" first
    dtype: str  # numpy dtype name, e.g. "float32"
    bytes: int  # per sample
    src_stage: int | None = None  # None until backend/stages.py has cut the programs; set in every schedule
    dst_stage: int | None = None
    wire: str = "fp32"  # what the payload carries (artifact/wire.py): int8 payloads are int8, int4 packed uint8


@dataclass
class StageInput:
    name: str  # graph input name
    source: str  # "model_input" | "message" | "carried"
    ref: str  # model input name, message id, or carried value name


@dataclass
class StageOutput:
    name: str  # graph output name
    role: str  # "message" | "carried" | "model_output"
    ref: str  # message id, carried value name, or model output name


@dataclass
class Stage:
    index: int
    file: str  # relative to OUT, e.g. "node0/stage003.onnx"
    inputs: list[StageInput] = field(default_factory=list)
    outputs: list[StageOutput] = field(default_factory=list)


@dataclass
class TensorSpec:
    name: str
    shape: list[int | str]  # "batch" first
    dtype: str


@dataclass
class Schedule:
    format_version: int
    nodes: int
    inputs: list[TensorSpec]  # model inputs, in call order
    outputs: list[TensorSpec]  # model outputs, flattened in pytree order
    output_structure: str  # torch.utils._pytree TreeSpec of the outputs, serialised (treespec_dumps)
    messages: list[Message]
    programs: list[list[Stage]]  # programs[k]: node k's stages in order
    inputs_on_all_nodes: bool = False  # every node takes the model inputs itself (nothing sent)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Schedule:
        """The Schedule `to_json` wrote (check the dict against the JSON Schema first)."""
        return cls(format_version=data["format_version"], nodes=data["nodes"],
                   inputs=[TensorSpec(**t) for t in data["inputs"]],
                   outputs=[TensorSpec(**t) for t in data["outputs"]],
                   output_structure=data["output_structure"],
                   messages=[Message(**m) for m in data["messages"]],
                   programs=[[Stage(index=st["index"], file=st["file"],
                                    inputs=[StageInput(**i) for i in st["inputs"]],
                                    outputs=[StageOutput(**o) for o in st["outputs"]])
                              for st in program]
                             for program in data["programs"]],
                   inputs_on_all_nodes=data.get("inputs_on_all_nodes", False))

    def message(self, message_id: str) -> Message:
        """The message with this id (KeyError if none)."""
        for m in self.messages:
            if m.id == message_id:
                return m
        raise KeyError(message_id)


@dataclass
class Manifest:
    format_version: int
    model_hash: str  # sha256 of the source model's weights (state_dict bytes) and architecture
    nodes: int
    files: dict[str, str]  # relative path -> sha256, every file but the manifest itself
    created_by: str
    settings: dict | None = None  # what made the export: model, nodes, budget, overlap, fine-tuning (schema)
    layers: list[dict] | None = None  # per layer: name, op, channels, macs, sent (runtime/info.py)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: dict) -> Manifest:
        """The Manifest `to_json` wrote (check the dict against the JSON Schema first)."""
        return cls(**data)

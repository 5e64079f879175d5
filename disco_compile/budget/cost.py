"""Cost model of a DISCO model, per sample (batch 1), in bytes of the traced dtypes.

- exchange bytes: activations sent between nodes inside the model: the units
  each SparseExchange sends (units owned by node i, needed and kept by node j),
  plus ungated traffic: inputs gathered for replicated ops and per-row
  statistics all-reduced for normalisations over split channels.
- io bytes: the input sent from node 0 to the other nodes (unless it is present
  on every node) and the output elements that node 0 does not own.
- dense: the same partition with every gate on.
- MACs: multiply-accumulates of the channel-mixing layers (Conv, Linear), the
  usual measure; node j's share follows mixing.py. Replicated mixing layers
  count whole on every node, functional ones too (F.conv2d, F.linear, x @ W
  with W a weight: `op_macs`). Per sample means per example of the batch,
  whatever dim 0 holds: a layer applied to windows or patches folded into
  dim 0 (Swin, MobileViT), or to tokens (seq-first attention, GPT-2's
  x.view(-1, C) @ W), counts its whole output per sample (`out_positions`:
  output elements per channel over the whole tensor / batch), so with nothing
  replicated the nodes' MACs sum to the whole. A mixing op that runs on a
  node's own channels as they are (a Linear along tokens) counts its share of
  the channels on each node (`channelwise_macs`).
- parameters per node: the weight entries a node uses (mixing.py), a node's
  share of every per-channel parameter (one entry per channel of the tensor the
  op reads: BatchNorm, LayerNorm, layer scales), and every other parameter whole.
"""
from __future__ import annotations

import operator
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import TensorMetadata
from torch.utils import _pytree as pytree

import torch.nn.functional as F

from ..artifact.wire import unit_bytes
from ..ops import mixing
from ..ir import REPLICATED, MixingLayer, Placement, ReplicatedOp, StatExchange, owners, units_per_sample
from ..ops.modules import SparseExchange


@dataclass
class CostReport:
    nodes: int
    exchange_bytes: int
    dense_exchange_bytes: int
    fixed_exchange_bytes: int
    io_bytes: int
    comm_bytes: int
    dense_comm_bytes: int
    macs_per_node: list[int]
    params_per_node: list[int]
    original_macs: int
    original_params: int
    replicated_ops: list[ReplicatedOp] = field(default_factory=list)

    @property
    def exchange_ratio(self) -> float:
        return self.exchange_bytes / self.dense_exchange_bytes if self.dense_exchange_bytes else 1.0

    @property
    def comm_ratio(self) -> float:
        return self.comm_bytes / self.dense_comm_bytes if self.dense_comm_bytes else 1.0

    @property
    def macs_ratio(self) -> float:
        return sum(self.macs_per_node) / self.original_macs

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(exchange_ratio=self.exchange_ratio, comm_ratio=self.comm_ratio, macs_ratio=self.macs_ratio)
        return d

    def table(self) -> str:
        lines = [
            f"nodes           {self.nodes}",
            f"exchange bytes  {_si(self.exchange_bytes, 'B'):>10}  (dense {_si(self.dense_exchange_bytes, 'B')}, "
            f"ratio {self.exchange_ratio:.3f}; ungated {_si(self.fixed_exchange_bytes, 'B')})",
            f"io bytes        {_si(self.io_bytes, 'B'):>10}",
            f"comm bytes      {_si(self.comm_bytes, 'B'):>10}  (dense {_si(self.dense_comm_bytes, 'B')}, "
            f"ratio {self.comm_ratio:.3f})",
            f"MACs            original {_si(self.original_macs, '')}; "
            f"all nodes {_ratio(sum(self.macs_per_node), self.original_macs)} of it",
        ]
        for k, (m, p) in enumerate(zip(self.macs_per_node, self.params_per_node, strict=True)):
            lines.append(f"  node {k}: MACs {_si(m, ''):>9} ({_ratio(m, self.original_macs)})   "
                         f"params {_si(p, ''):>9} ({_ratio(p, self.original_params)})")
        if self.replicated_ops:
            lines.append(f"replicated ops ({len(self.replicated_ops)}): inputs gathered, run whole on every node")
            lines += [f"  {r.node} [{r.target}]: {r.reason}" for r in self.replicated_ops]
        else:
            lines.append("replicated ops: none")
        return "\n".join(lines)


def _ratio(part: float, whole: float) -> str:
    return f"{part / whole:.3f}" if whole else "-"


def _si(value: float, unit: str) -> str:
    """1234567 -> '1.235 M' + unit: decimal prefixes, so bytes read as kB/MB/GB."""
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3f} {prefix}{unit}"
    return f"{value:g} {unit}".rstrip()


def _sample_elems(node: fx.Node, labels: torch.Tensor) -> int:
    return units_per_sample(node.meta["tensor_meta"].shape, labels)


def _owned_bytes(node: fx.Node, exclude: int | None = None) -> int:
    """Bytes per sample of `node`'s value held by some node (not replicated), optionally not by `exclude`."""
    p: Placement = node.meta["disco"]
    if p.labels is None:
        return 0
    owned = (p.owner != REPLICATED) if exclude is None else (p.owner != REPLICATED) & (p.owner != exclude)
    return int(owned.sum()) * _sample_elems(node, p.labels) * node.meta["tensor_meta"].dtype.itemsize


def _holders(node: fx.Node) -> int:
    p: Placement = node.meta["disco"]
    if p.labels is None:
        return 0
    return len({int(o) for o in p.owner.unique() if o != REPLICATED})


def fixed_exchange_bytes(gm: fx.GraphModule, nodes: int, replicated: list[ReplicatedOp],
                         stats: list[StatExchange]) -> int:
    by_name = {n.name: n for n in gm.graph.nodes}
    total = 0
    for op in replicated:  # gather: every element owned by one node goes to the N-1 others
        total += sum(_owned_bytes(by_name[name]) for name in op.inputs) * (nodes - 1)
    for s in stats:  # partial results all-reduced among the nodes holding the input
        k = _holders(by_name[s.in_node])
        receivers = nodes if s.to_all else k
        total += s.values * s.itemsize * k * (receivers - 1) if k > 1 or s.to_all else 0
    return total


def io_bytes(gm: fx.GraphModule, nodes: int, batch: int, input_on_all_nodes: bool,
             input_wires: dict[str, str] | None = None) -> int:
    """Bytes a sample of the model inputs (node 0 sends each other node every input, at its wire in
    `input_wires`, by input name; fp32 if absent) and of the model outputs (node 0 gathers them) cost."""
    if nodes == 1:
        return 0
    total = 0
    if not input_on_all_nodes:
        for n in gm.graph.nodes:
            if n.op == "placeholder" and isinstance(n.meta.get("tensor_meta"), TensorMetadata):
                meta = n.meta["tensor_meta"]
                wire = (input_wires or {}).get(n.target, "fp32")
                total += int(unit_bytes(meta.shape.numel() // batch, meta.dtype.itemsize, wire)) * (nodes - 1)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    for leaf in pytree.tree_leaves(out_node.args[0], is_leaf=lambda x: isinstance(x, fx.Node)):
        if isinstance(leaf, fx.Node) and "disco" in leaf.meta:
            total += _owned_bytes(leaf, exclude=0)
    return total


def _per_channel_share(param: nn.Parameter, owner: torch.Tensor | None, nodes: int) -> list[int]:
    if owner is not None and param.numel() == owner.numel() and owner.numel() > 1:
        flat = owner.reshape(-1)
        return [int(((flat == j) | (flat == REPLICATED)).sum()) for j in range(nodes)]
    return [param.numel()] * nodes


def params_per_node(gm: fx.GraphModule, nodes: int, layers: list[MixingLayer],
                    exchanges: dict[str, SparseExchange], owner_of: torch.Tensor) -> list[int]:
    per_node = [0] * nodes
    counted = {id(p) for ex in exchanges.values() for p in ex.parameters()}  # gates, scores: training only
    for layer in layers:
        module = gm.get_submodule(layer.module)
        counted.update(id(p) for p in module.parameters(recurse=False))
        out_owner = owner_of[layer.out_labels.reshape(-1)]
        for j in range(nodes):
            per_node[j] += mixing.weights_used(layer, out_owner, available(layer, exchanges, owner_of, j), j)
            if module.bias is not None:
                per_node[j] += int((out_owner == j).sum())
    for n in gm.graph.nodes:
        params, placement = _node_params(gm, n, counted)
        owner = placement.owner if placement is not None else None
        for p in params:
            counted.add(id(p))
            for j, share in enumerate(_per_channel_share(p, owner, nodes)):
                per_node[j] += share
    for p in gm.parameters():  # parameters used outside the graph's ops (none for traced models)
        if id(p) not in counted:
            counted.add(id(p))
            per_node = [x + p.numel() for x in per_node]
    return per_node


def _node_params(gm: fx.GraphModule, n: fx.Node, counted: set[int]) -> tuple[list[nn.Parameter], Placement | None]:
    """The parameters graph node `n` uses that are not counted yet, and the placement of the tensor they are
    per-channel to (a module's input; a parameter's first labelled user)."""
    if n.op == "call_module":
        params = [p for p in gm.get_submodule(n.target).parameters(recurse=False) if id(p) not in counted]
        return params, (n.all_input_nodes[0].meta.get("disco") if n.all_input_nodes else None)
    if n.op == "get_attr":
        value = gm.get_parameter(n.target) if _is_param(gm, n.target) else None
        params = [value] if value is not None and id(value) not in counted else []
        return params, next((u.meta.get("disco") for u in n.users if u.meta.get("disco") is not None
                             and u.meta["disco"].labels is not None), None)
    return [], None


def _is_param(gm: fx.GraphModule, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def available(layer: MixingLayer, exchanges: dict[str, SparseExchange], owner_of: torch.Tensor,
              node: int) -> torch.Tensor:
    """Input columns node `node` holds for this layer: local, replicated, and received."""
    in_owner = owners(layer.in_labels, owner_of)
    local = mixing.local_columns(None if in_owner is None else in_owner.reshape(-1), layer, node)
    if layer.exchange is None:
        return local
    ex = exchanges[layer.exchange]
    return local | (ex.remote[node] & ex.keep[node])


_LINEAR_FUNCTIONS = (F.linear, torch.ops.aten.linear.default)
_CONV_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d, torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default,
                   torch.ops.aten.conv3d.default, torch.ops.aten.convolution.default)
_PRODUCTS = {torch.addmm: 2, torch.ops.aten.addmm.default: 2, torch.matmul: 1, operator.matmul: 1,
             torch.ops.aten.mm.default: 1}


def _shape(gm: fx.GraphModule, a) -> tuple[int, ...] | None:
    if isinstance(a, fx.Node) and a.op == "get_attr":
        return tuple(gm.get_parameter(a.target).shape) if _is_param(gm, a.target) else None
    meta = a.meta.get("tensor_meta") if isinstance(a, fx.Node) else None
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def _weight_reduction(gm: fx.GraphModule, n: fx.Node) -> int:
    """Multiply-accumulates per output element of a mixing op called as a function; 0 for any other op."""
    if n.target in _LINEAR_FUNCTIONS or n.target in _CONV_FUNCTIONS:
        w = _shape(gm, n.args[1] if len(n.args) > 1 else n.kwargs.get("weight"))
        return 0 if w is None else int(torch.Size(w[1:]).numel())
    if n.target in _PRODUCTS and len(n.args) > _PRODUCTS[n.target]:
        w = n.args[_PRODUCTS[n.target]]  # x @ W with W a weight: a linear layer
        shape = _shape(gm, w) if isinstance(w, fx.Node) and w.op == "get_attr" else None
        return shape[0] if shape is not None and len(shape) == 2 else 0
    return 0


def op_macs(gm: fx.GraphModule, node: fx.Node, batch: int) -> int:
    """MACs per sample of graph node `node` if it is a mixing layer (a Conv or Linear module, or one called as a
    function), else 0: its whole output (over the batch, / batch) times the products per output element."""
    meta = node.meta.get("tensor_meta")
    if not isinstance(meta, TensorMetadata):
        return 0
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.Linear):
            per_output = m.in_features
        elif isinstance(m, nn.modules.conv._ConvNd):
            per_output = m.in_channels // m.groups * m.weight[0, 0].numel()
        else:
            return 0
    elif node.op == "call_function":
        per_output = _weight_reduction(gm, node)
    else:
        return 0
    return meta.shape.numel() // batch * per_output


def out_positions(gm: fx.GraphModule, layer: MixingLayer, batch: int) -> int:
    """Output elements per channel per sample of `layer` over its whole output tensor (module docstring)."""
    shape = next(n for n in gm.graph.nodes if n.name == layer.node).meta["tensor_meta"].shape
    return shape.numel() // batch // layer.out_channels


def layer_macs(layer: MixingLayer, exchanges: dict[str, SparseExchange], owner_of: torch.Tensor,
               nodes: int) -> list[int]:
    """MACs per sample node j computes for `layer`: the weights it uses times the output positions."""
    out_owner = owner_of[layer.out_labels.reshape(-1)]
    return [mixing.weights_used(layer, out_owner, available(layer, exchanges, owner_of, j), j) * layer.out_positions
            for j in range(nodes)]


def channelwise_macs(gm: fx.GraphModule, owner_of: torch.Tensor, nodes: int, batch: int,
                     skip: set[str]) -> dict[str, list[int]]:
    """Per graph node not in `skip` (the mixing layers and replicated ops) that has MACs (`op_macs`) and runs on
    its input's split channels as they are (a token-mixing Linear): node j's MACs, the whole times the share of
    the input's label positions node j holds (its own and replicated ones)."""
    out = {}
    for n in gm.graph.nodes:
        macs = 0 if n.name in skip or not n.all_input_nodes else op_macs(gm, n, batch)
        placement = n.all_input_nodes[0].meta.get("disco") if macs else None
        if placement is None or placement.labels is None:
            continue
        own = owners(placement.labels, owner_of).reshape(-1)
        out[n.name] = [macs * int(((own == j) | (own == REPLICATED)).sum()) // own.numel() for j in range(nodes)]
    return out


def macs_per_node(layers: list[MixingLayer], exchanges: dict[str, SparseExchange], owner_of: torch.Tensor,
                  nodes: int, replicated_macs: int, channelwise: dict[str, list[int]]) -> list[int]:
    per_node = [replicated_macs + sum(m[j] for m in channelwise.values()) for j in range(nodes)]
    for layer in layers:
        for j, macs in enumerate(layer_macs(layer, exchanges, owner_of, nodes)):
            per_node[j] += macs
    return per_node


def exchange_bytes(exchanges: dict[str, SparseExchange], dense: bool) -> int:
    return sum(int(ex.sent_units(dense).sum()) * ex.unit_bytes for ex in exchanges.values())

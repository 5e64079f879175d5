"""Lowering: turn a DISCO model with hardened gates into one program per node.

A tensor whose channels vary along dims D (ir.py labels) is held by node j in
its *local representation*: the full tensor with the dims D collapsed into one
axis (at D[0]) and restricted to the units node j holds (its own and the
replicated ones), in an order recorded as `Local.units`. Replicated tensors
are held whole.

Per DISCO op, on node j:
- SparseExchange: send each destination the kept units it needs, one message
  per (src, dst) pair whose `channels` are the hardened index list; receive
  what the others send.
- Conv/Linear (a BatchNorm right after it folded into its weights):
      y[T_j] = W[T_j, local] x_local + b[T_j]          first, while messages fly
             + sum_i (W[T_j, G_ij] * gate_ij) x_ij      as each message arrives
  Each received term's Conv carries a zero bias, so onnxruntime fuses it with
  the Add and a following Relu into one kernel. Sums are then reassociated so
  that terms needing no message (a residual branch) are added before the wait:
      relu((p + r) + z) -> relu((p + z) + r)
  leaves one fused Conv + Add + Relu for after the message (_local_terms_first).
  Without overlap (`lower(..., overlap=False)`) the node instead waits for all
  its messages and runs one Conv over the concatenation [x_local | x_ij ...]
  with the matching columns [W[T_j, local] | W[T_j, G_ij] * gate_ij ...]: the
  same sum, computed at once. Nothing runs while the messages fly, but there
  is one kernel instead of several (a product over few received channels runs
  at half the MAC rate of one over many in onnxruntime), no Add, and about
  half as many stages; the better choice where the link is fast.
  Grouped convs whose groups stay on one node run on the node's groups alone;
  others rebuild the group inputs with zeros where nothing was sent.
- channelwise ops run on the local tensor (per-channel parameters sliced); adaptive average
  pooling between sizes that do not divide (which torch.onnx cannot export) as two matrix products;
  elementwise ops first bring their inputs to one unit order.
- data movement (view, permute, cat, split, ...): either the op itself on the
  local tensor (whole inputs narrowed to the held units if need be) or a
  gather along the local axis, each accepted only if it yields, on element-id
  tensors, exactly the elements node j must hold.
- attention core (attention.py, window_attention.py): run on the whole heads node j owns, with
  those heads' rows of per-head tensors.
- ops without a rule (replicated): inputs gathered whole, op run whole.
- model outputs: node 0 receives the parts it does not hold.

Points where a node sends, receives or produces a model output are marked in
the graph with the marker functions below; stages.py cuts the graph there.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.immutable_collections import immutable_dict, immutable_list
from torch.fx.passes.shape_prop import TensorMetadata
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torch.utils import _pytree as pytree

from ..ops import rules
from ..errors import DiscoError
from ..ir import REPLICATED, MixingLayer, channel_dims
from ..ops.modules import SparseExchange
from ..artifact.schedule import BATCH, Message


def _mutable(value):
    """An fx output argument with fx's immutable_dict/immutable_list replaced by dict/list: what the
    GraphModule returns, so the exported output structure is the model's."""
    if isinstance(value, immutable_dict):
        return {k: _mutable(v) for k, v in value.items()}
    if isinstance(value, immutable_list):
        return [_mutable(v) for v in value]
    if type(value) is tuple:
        return tuple(_mutable(v) for v in value)
    return value


class LoweringError(DiscoError):
    """A DISCO op that cannot be lowered to per-node programs."""


# ---------------------------------------------------------------- markers

def recv(message_id: str) -> torch.Tensor:
    """Marker: the payload of a received message (a stage input)."""
    raise RuntimeError("marker: node programs run through stages.py")


def send(message_id: str, payload: torch.Tensor) -> None:
    """Marker: send `payload` as message `message_id` (a stage output)."""
    raise RuntimeError("marker: node programs run through stages.py")


def model_output(name: str, value: torch.Tensor) -> None:
    """Marker: model output `name`, produced on node 0 (a stage output)."""
    raise RuntimeError("marker: node programs run through stages.py")


# ---------------------------------------------------------------- data

@dataclass
class Local:
    """What one node holds of one DISCO value."""
    node: fx.Node | None = None  # None: holds nothing of it (or a non-tensor value)
    units: torch.Tensor | None = None  # held units in local order; None: the whole tensor
    value: Any = None  # non-tensor values: the concrete value on this node (batch 1)
    full: Any = None  # non-tensor values: the concrete value in the whole model (batch 1)
    received: list[tuple[Message, fx.Node]] = field(default_factory=list)  # exchanges: payloads received


@dataclass
class NodeProgram:
    node: int
    graph: fx.Graph
    root: nn.Module
    shapes: dict[str, tuple[int, ...]]  # per-sample (batch 1) shape of tensor-valued graph nodes
    dtypes: dict[str, torch.dtype]


@dataclass
class Lowered:
    programs: list[NodeProgram]
    messages: list[Message]
    inputs: list[tuple[str, tuple[int, ...], torch.dtype]]
    outputs: list[tuple[str, tuple[int, ...], torch.dtype]]
    output_spec: pytree.TreeSpec


def _is_tensor_meta(meta) -> bool:
    return isinstance(meta, TensorMetadata)


class Layout:
    """The label layout of one DISCO tensor: per-sample shape, channel dims, owner per unit."""

    def __init__(self, node: fx.Node):
        meta = node.meta["tensor_meta"]
        self.name = node.name
        self.shape = (1,) + tuple(meta.shape[1:])
        self.dtype = meta.dtype
        labels = node.meta["disco"].labels
        self.dims = channel_dims(labels)
        if self.dims and self.dims != tuple(range(self.dims[0], self.dims[-1] + 1)):
            raise LoweringError(f"'{node.name}': channels vary along non-adjacent dims {self.dims}")
        owner = node.meta["disco"].owner
        self.owner = None if owner is None else owner.reshape(-1)

    @property
    def axis(self) -> int | None:
        return self.dims[0] if self.dims else None

    @property
    def units(self) -> int:
        return 0 if self.owner is None else self.owner.numel()

    def held(self, j: int) -> torch.Tensor | None:
        if self.owner is None:
            return None
        return ((self.owner == j) | (self.owner == REPLICATED)).nonzero().flatten()

    def owned(self, j: int) -> torch.Tensor:
        return (self.owner == j).nonzero().flatten()

    def rep_shape(self, units: int | None) -> tuple[int, ...]:
        """Shape of the local representation holding `units` units (None: the whole tensor)."""
        if units is None or not self.dims:
            return self.shape
        return self.shape[:self.dims[0]] + (units,) + self.shape[self.dims[-1] + 1:]

    def as_rep(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(self.rep_shape(self.units)) if self.dims else t


class Lowerer:
    """Shared state of one lowering: layouts, messages, folded BatchNorms."""

    def __init__(self, gm: fx.GraphModule, plan, exchange_messages: dict[str, list[Message]],
                 gates: dict[str, torch.Tensor], overlap: bool = True):
        self.gm = gm
        self.overlap = overlap
        self.nodes = plan.nodes
        self.owner_of = plan.owner_of
        self.layers = {layer.node: layer for layer in plan.layers}
        self.replicated = {r.node for r in plan.replicated}
        self.stats = {s.node: s for s in plan.stats}
        self.exchange_messages = exchange_messages
        self.gates = gates
        self.messages: list[Message] = [m for ms in exchange_messages.values() for m in ms]
        self._keyed: dict[tuple, Message] = {}
        self._layouts: dict[str, Layout] = {}
        self.folded = self._foldable_batchnorms()
        self.bn_after = {conv: bn for bn, conv in self.folded.items()}
        out_node = next(n for n in gm.graph.nodes if n.op == "output")
        leaves, self.output_spec = pytree.tree_flatten(_mutable(out_node.args[0]))
        if not all(isinstance(leaf, fx.Node) for leaf in leaves):
            raise LoweringError("a model output that is not a tensor computed by the model")
        self.output_leaves: list[fx.Node] = leaves

    def layout(self, n: fx.Node) -> Layout:
        if n.name not in self._layouts:
            self._layouts[n.name] = Layout(n)
        return self._layouts[n.name]

    def message(self, kind: str, tensor: str, src: int, dst: int, channels: torch.Tensor,
                shape: tuple[int, ...], dtype: torch.dtype) -> Message:
        """The message of this kind for (tensor, src, dst); made by whichever side asks first."""
        key = (kind, tensor, src, dst)
        if key not in self._keyed:
            numel = 1
            for s in shape[1:]:
                numel *= s
            msg = Message(id=f"{kind}{len(self.messages)}", src=src, dst=dst, kind=kind, tensor=tensor,
                          channels=[int(c) for c in channels], shape=[BATCH, *shape[1:]],
                          dtype=str(dtype).replace("torch.", ""), bytes=numel * dtype.itemsize,
                          src_stage=-1, dst_stage=-1)
            self.messages.append(msg)
            self._keyed[key] = msg
        return self._keyed[key]

    def _foldable_batchnorms(self) -> dict[str, str]:
        """BatchNorm node -> the Conv node it directly follows (the conv's only user)."""
        folded = {}
        for n in self.gm.graph.nodes:
            if n.op != "call_module" or not isinstance(self.gm.get_submodule(n.target), nn.modules.batchnorm._BatchNorm):
                continue
            src = n.all_input_nodes[0]
            layer = self.layers.get(src.name)
            bn = self.gm.get_submodule(n.target)
            if layer is not None and layer.kind == "conv" and len(src.users) == 1 and bn.track_running_stats \
                    and bn.running_mean is not None:
                folded[n.name] = src.name
        return folded

    def weights(self, layer: MixingLayer) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's weight and bias, with a following BatchNorm folded in."""
        module = self.gm.get_submodule(layer.module)
        w, b = module.weight.detach(), None if module.bias is None else module.bias.detach()
        bn_node = self.bn_after.get(layer.node)
        if bn_node is None:
            return w, b
        bn = self.gm.get_submodule(next(n for n in self.gm.graph.nodes if n.name == bn_node).target)
        w, b = fuse_conv_bn_weights(w, b, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
        return w.detach(), b.detach()


class NodeBuilder:
    """Builds node j's program, walking the DISCO graph in order."""

    def __init__(self, low: Lowerer, j: int):
        self.low = low
        self.j = j
        self.g = fx.Graph()
        self.root = nn.Module()
        self.env: dict[str, Local] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self._consts = 0

    def program(self) -> NodeProgram:
        return NodeProgram(self.j, self.g, self.root, self.shapes, self.dtypes)

    # ------------------------------------------------------------ graph helpers
    def const(self, hint: str, t: torch.Tensor) -> fx.Node:
        name = f"c{self._consts}_{hint.replace('.', '_')}"
        self._consts += 1
        self.root.register_buffer(name, t.detach().clone().contiguous())
        return self._typed(self.g.get_attr(name), tuple(t.shape), t.dtype)

    def _typed(self, node: fx.Node, shape: tuple[int, ...] | None, dtype: torch.dtype | None) -> fx.Node:
        if shape is not None:
            self.shapes[node.name] = tuple(shape)
            self.dtypes[node.name] = dtype
        return node

    def call(self, fn, args: tuple, kwargs: dict | None = None, shape=None, dtype=torch.float32) -> fx.Node:
        return self._typed(self.g.call_function(fn, args, kwargs or {}), shape, dtype)

    def select(self, x: fx.Node, axis: int, positions: torch.Tensor) -> fx.Node:
        shape = self.shapes[x.name]
        if positions.numel() == shape[axis] and torch.equal(positions, torch.arange(positions.numel())):
            return x
        out = shape[:axis] + (positions.numel(),) + shape[axis + 1:]
        return self.call(torch.index_select, (x, axis, self.const("index", positions)), shape=out,
                         dtype=self.dtypes[x.name])

    def reshape(self, x: fx.Node, shape: tuple[int, ...]) -> fx.Node:
        if self.shapes[x.name] == shape:
            return x
        return self._typed(self.g.call_method("reshape", (x, (-1,) + tuple(shape[1:]))), shape, self.dtypes[x.name])

    def hold(self, n: fx.Node, node: fx.Node | None, units: torch.Tensor | None) -> None:
        if node is not None:
            lay = self.low.layout(n)
            self._typed(node, lay.rep_shape(None if units is None else units.numel()), lay.dtype)
        self.env[n.name] = Local(node, units)

    def aligned(self, n: fx.Node, units: torch.Tensor) -> fx.Node:
        """Node j's local tensor of `n` holding exactly `units`, in that order."""
        loc = self.env[n.name]
        lay = self.low.layout(n)
        if loc.units is None:
            return self.select(self.reshape(loc.node, lay.rep_shape(lay.units)), lay.axis, units)
        where = {int(u): k for k, u in enumerate(loc.units)}
        missing = [int(u) for u in units if int(u) not in where]
        if missing or loc.node is None:
            raise LoweringError(f"node {self.j} needs units {missing[:5]} of '{n.name}' that it does not hold")
        return self.select(loc.node, lay.axis, torch.tensor([where[int(u)] for u in units], dtype=torch.long))

    def value(self, a: fx.Node):
        """An argument as node j computes it: its graph node, or its concrete non-tensor value."""
        loc = self.env[a.name]
        return loc.node if loc.node is not None else loc.value

    def example(self, a: fx.Node, whole: bool):
        """A concrete stand-in for an argument, to evaluate sizes: a meta tensor of the local shape
        (or of the whole tensor's shape), or the concrete non-tensor value."""
        loc = self.env[a.name]
        if _is_tensor_meta(a.meta.get("tensor_meta")):
            lay = self.low.layout(a)
            shape = lay.shape if whole or loc.node is None else self.shapes[loc.node.name]
            return torch.empty(shape, dtype=lay.dtype, device="meta")
        return loc.full if whole else loc.value

    def emit(self, n: fx.Node, module: nn.Module | None, args, kwargs, shape=None, dtype=None) -> fx.Node:
        if n.op == "call_module":
            name = f"m_{n.target.replace('.', '_')}"
            if not hasattr(self.root, name):
                self.root.add_module(name, copy.deepcopy(module))
            node = self.g.call_module(name, args, kwargs)
        elif n.op == "call_method":
            node = self.g.call_method(n.target, args, kwargs)
        else:
            node = self.g.call_function(n.target, args, kwargs)
        return self._typed(node, shape, dtype)

    # ------------------------------------------------------------ dispatch
    def lower(self, n: fx.Node) -> None:
        if n.op == "placeholder":
            return self.placeholder(n)
        if n.op == "get_attr":
            value = operator.attrgetter(n.target)(self.low.gm)
            if isinstance(value, torch.Tensor):
                self.env[n.name] = Local(self.const(n.target, value))
            else:
                self.env[n.name] = Local(value=value, full=value)
            return
        if n.op == "output":
            return self.outputs()
        module = self.low.gm.get_submodule(n.target) if n.op == "call_module" else None
        if isinstance(module, SparseExchange):
            return self.exchange(n)
        if n.name in self.low.layers:
            return self.mixing(n, self.low.layers[n.name])
        if n.name in self.low.folded:
            self.env[n.name] = self.env[n.all_input_nodes[0].name]
            return
        if n.name in self.low.replicated:
            return self.replicated(n, module)
        if n.name in self.low.stats:
            return self.statistics(n, module)
        if n.target is operator.getitem and not _is_tensor_meta(n.args[0].meta.get("tensor_meta")) \
                and _is_tensor_meta(n.meta.get("tensor_meta")):
            return self.relayout(n, module)  # an element of a split/chunk
        if not _is_tensor_meta(n.meta.get("tensor_meta")):
            return self.structural(n, module)
        if self.low.layout(n).owner is None:
            return self.whole(n, module)
        rule = rules.lookup(n, module)
        if rule in (rules.attention, rules.window_attention):
            return self.attention(n)
        if rule in (rules.relayout, rules.cat, rules.getitem, rules.pixel_shuffle, rules.patch_merging):
            return self.relayout(n, module)
        if rule is rules.elementwise:
            return self.elementwise(n, module)
        return self.channelwise(n, module)

    # ------------------------------------------------------------ inputs and outputs
    def placeholder(self, n: fx.Node) -> None:
        lay = self.low.layout(n)
        if self.j == 0:
            node = self._typed(self.g.placeholder(n.name), lay.shape, lay.dtype)
            for dst in range(1, self.low.nodes):
                msg = self.low.message("input", n.name, 0, dst, torch.arange(0), lay.shape, lay.dtype)
                self.call(send, (msg.id, node), shape=None)
        else:
            msg = self.low.message("input", n.name, 0, self.j, torch.arange(0), lay.shape, lay.dtype)
            node = self.call(recv, (msg.id,), shape=lay.shape, dtype=lay.dtype)
        self.env[n.name] = Local(node)

    def outputs(self) -> None:
        for k, leaf in enumerate(self.low.output_leaves):
            if self.j == 0:
                self.call(model_output, (f"output{k}", self.gathered(leaf, "output")), shape=None)
            else:
                self.send_owned(leaf, "output", [0])

    def send_owned(self, n: fx.Node, kind: str, receivers: list[int]) -> None:
        """Send the units of `n` this node owns to each receiver."""
        lay = self.low.layout(n)
        if lay.owner is None:
            return
        mine = lay.owned(self.j)
        if mine.numel() == 0:
            return
        payload = self.aligned(n, mine)
        for dst in receivers:
            if dst != self.j:
                msg = self.low.message(kind, n.name, self.j, dst, mine, lay.rep_shape(mine.numel()), lay.dtype)
                self.call(send, (msg.id, payload), shape=None)

    def gathered(self, n: fx.Node, kind: str) -> fx.Node:
        """The whole tensor `n` on this node: its own part plus the parts the other owners send."""
        loc = self.env[n.name]
        if loc.units is None:
            return loc.node
        lay = self.low.layout(n)
        parts, order = [], []
        held = lay.held(self.j)
        if held.numel():
            parts.append(self.aligned(n, held))
            order.append(held)
        for src in range(self.low.nodes):
            theirs = lay.owned(src)
            if src == self.j or theirs.numel() == 0:
                continue
            msg = self.low.message(kind, n.name, src, self.j, theirs, lay.rep_shape(theirs.numel()), lay.dtype)
            parts.append(self.call(recv, (msg.id,), shape=lay.rep_shape(theirs.numel()), dtype=lay.dtype))
            order.append(theirs)
        units = torch.cat(order)
        rep = lay.rep_shape(units.numel())
        cat = parts[0] if len(parts) == 1 else self.call(torch.cat, (parts, lay.axis), shape=rep, dtype=lay.dtype)
        return self.reshape(self.select(cat, lay.axis, torch.argsort(units)), lay.shape)

    # ------------------------------------------------------------ exchange and mixing
    def exchange(self, n: fx.Node) -> None:
        src = n.all_input_nodes[0]
        lay = self.low.layout(src)
        messages = self.low.exchange_messages.get(src.name, [])
        for msg in messages:
            if msg.src == self.j:
                payload = self.aligned(src, torch.tensor(msg.channels, dtype=torch.long))
                self.call(send, (msg.id, payload), shape=None)
        received = [(msg, self.call(recv, (msg.id,), shape=lay.rep_shape(len(msg.channels)), dtype=lay.dtype))
                    for msg in messages if msg.dst == self.j]
        loc = self.env[src.name]
        self.env[n.name] = Local(loc.node, loc.units, received=received)

    def mixing(self, n: fx.Node, layer: MixingLayer) -> None:
        out_owner = self.low.owner_of[layer.out_labels.reshape(-1)]
        rows = (out_owner == self.j).nonzero().flatten()
        if rows.numel() == 0:
            self.env[n.name] = Local(None, rows)
            return
        module = self.low.gm.get_submodule(layer.module)
        weight, bias = self.low.weights(layer)
        x_node = n.all_input_nodes[0]
        source = x_node.all_input_nodes[0] if layer.exchange is not None else x_node
        loc = self.env[x_node.name]
        if layer.groups > 1 and layer.exchange is not None:
            out = self.grouped_with_exchange(n, module, layer, source, loc, weight, bias, rows)
        elif layer.groups > 1:
            out = self.grouped_local(n, module, layer, source, weight[rows], None if bias is None else bias[rows], rows)
        else:
            out = self.block_sum(n, module, layer, loc, weight[rows], None if bias is None else bias[rows], rows)
        self.hold(n, out, rows)

    def block_sum(self, n, module, layer, loc: Local, w_rows, b_rows, rows) -> fx.Node:
        if loc.units is None:  # input held whole: every column is local
            return self.apply_weights(n, module, loc.node, w_rows, b_rows, rows)
        parts = [(loc.node, w_rows[:, loc.units])] if loc.node is not None and loc.units.numel() else []
        for msg, payload in loc.received:
            cols = torch.tensor(msg.channels, dtype=torch.long)
            gate = self.low.gates[layer.exchange][self.j, cols]
            parts.append((payload, w_rows[:, cols] * gate.reshape((1, -1) + (1,) * (w_rows.dim() - 2))))
        if not parts:
            raise LoweringError(f"'{n.name}': node {self.j} owns output rows but holds and receives no input "
                                f"channel at this budget")
        if not self.low.overlap and len(parts) > 1:  # one product over [local | received] once all arrived
            axis = self.low.layout(n.all_input_nodes[0]).axis
            shape = list(self.shapes[parts[0][0].name])
            shape[axis] = sum(w.shape[1] for _, w in parts)
            x = self.call(torch.cat, ([x for x, _ in parts], axis), shape=tuple(shape))
            return self.apply_weights(n, module, x, torch.cat([w for _, w in parts], 1), b_rows, rows)
        terms = []
        for x, w in parts:
            if not terms:
                bias = b_rows
            elif w.dim() > 2:  # zeros: onnxruntime fuses Conv + Add (+ Relu) only into a Conv with a bias input
                bias = torch.zeros(w.shape[0], dtype=w.dtype)
            else:
                bias = None
            terms.append(self.apply_weights(n, module, x, w, bias, rows))
        out = terms[0]
        for t in terms[1:]:
            out = self.call(operator.add, (out, t), shape=self.shapes[out.name])
        return out

    def apply_weights(self, n, module, x, w, b, rows) -> fx.Node:
        shape = self.low.layout(n).rep_shape(rows.numel())
        wn, bn = self.const(f"{n.name}_w", w), None if b is None else self.const(f"{n.name}_b", b)
        if isinstance(module, nn.Linear) or w.dim() == 2:
            return self.call(F.linear, (x, wn, bn), shape=shape)
        return self.conv(module, x, wn, bn, 1, shape)

    def conv(self, module, x, w, b, groups, shape) -> fx.Node:
        fn = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[len(shape)]
        padding = module.padding
        if module.padding_mode != "zeros":  # Conv2d and PartitionedConv both keep torch's padding tuple
            x = self.call(F.pad, (x, module._reversed_padding_repeated_twice), {"mode": module.padding_mode})
            padding = 0
        return self.call(fn, (x, w, b, module.stride, padding, module.dilation, groups), shape=shape)

    def grouped_local(self, n, module, layer, source, w_rows, b_rows, rows) -> fx.Node:
        per_in, per_out = layer.in_channels // layer.groups, layer.out_channels // layer.groups
        groups = torch.unique(rows // per_out)
        if not torch.equal(torch.sort(rows).values, (groups[:, None] * per_out + torch.arange(per_out)).flatten()):
            raise LoweringError(f"'{n.name}': node {self.j} holds part of a group's output channels")
        x = self.aligned(source, (groups[:, None] * per_in + torch.arange(per_in)).flatten())
        shape = self.low.layout(n).rep_shape(rows.numel())
        wn, bn = self.const(f"{n.name}_w", w_rows), None if b_rows is None else self.const(f"{n.name}_b", b_rows)
        return self.conv(module, x, wn, bn, groups.numel(), shape)

    def grouped_with_exchange(self, n, module, layer, source, loc, weight, bias, rows) -> fx.Node:
        """Groups split across nodes: the whole grouped conv on the input channels this node
        holds or receives (zeros for the rest), keeping this node's rows."""
        lay = self.low.layout(source)
        parts, order = [], []
        if loc.node is not None and loc.units.numel():
            parts.append(loc.node)
            order.append(loc.units)
        for msg, payload in loc.received:
            cols = torch.tensor(msg.channels, dtype=torch.long)
            gate = self.low.gates[layer.exchange][self.j, cols].reshape((1, -1) + (1,) * (len(lay.shape) - 2))
            parts.append(self.call(operator.mul, (payload, self.const("gate", gate)), shape=self.shapes[payload.name]))
            order.append(cols)
        have = torch.cat(order)
        missing = torch.tensor(sorted(set(range(layer.in_channels)) - set(have.tolist())), dtype=torch.long)
        if missing.numel():
            one = self.select(parts[0], 1, torch.zeros(1, dtype=torch.long))
            zero = self.call(torch.zeros_like, (one,), shape=self.shapes[one.name])
            parts.append(self._typed(self.g.call_method("expand", (zero, -1, missing.numel(), *([-1] * (len(lay.shape) - 2)))),
                                     lay.rep_shape(missing.numel()), lay.dtype))
            have = torch.cat([have, missing])
        x = self.call(torch.cat, (parts, 1), shape=lay.shape)
        x = self.select(x, 1, torch.argsort(have))
        full = self.low.layout(n).shape
        wn, bn = self.const(f"{n.name}_w", weight), None if bias is None else self.const(f"{n.name}_b", bias)
        return self.select(self.conv(module, x, wn, bn, layer.groups, full), 1, rows)

    # ------------------------------------------------------------ other ops
    def whole(self, n: fx.Node, module) -> None:
        """A replicated value computed from replicated inputs: the op as it is, or, on constants alone (Swin's
        relative position bias from its table), its value as a constant."""
        for a in n.all_input_nodes:
            if self.env[a.name].units is not None:
                raise LoweringError(f"'{n.name}' reads '{a.name}', split across nodes, as a whole")
        held = [self.env[a.name].node for a in n.all_input_nodes]
        if held and all(h is None or h.op == "get_attr" for h in held) and any(h is not None for h in held):
            def constant(a: fx.Node):
                loc = self.env[a.name]
                return loc.value if loc.node is None else operator.attrgetter(loc.node.target)(self.root)
            with torch.no_grad():
                value = _call_like(n, module, *fx.node.map_arg((n.args, n.kwargs), constant))
            self.env[n.name] = Local(self.const(n.name, value))
            return
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), self.value)
        lay = self.low.layout(n)
        self.env[n.name] = Local(self.emit(n, module, args, kwargs, lay.shape, lay.dtype))

    def replicated(self, n: fx.Node, module) -> None:
        """No rule: every node gathers the inputs whole and runs the op whole."""
        for a in n.all_input_nodes:
            if self.env[a.name].units is not None:
                self.send_owned(a, "gather", list(range(self.low.nodes)))
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: self.gathered(a, "gather")
                                       if self.env[a.name].units is not None else self.value(a))
        meta = n.meta.get("tensor_meta")
        lay = self.low.layout(n) if _is_tensor_meta(meta) else None
        node = self.emit(n, module, args, kwargs, *((lay.shape, lay.dtype) if lay else (None, None)))
        if lay is None:
            raise LoweringError(f"'{n.name}' ({rules.describe_target(n, module)}) is replicated and returns "
                                f"several values; not lowered yet")
        self.env[n.name] = Local(node)

    def structural(self, n: fx.Node, module) -> None:
        """Non-tensor values (sizes and arithmetic on them): computed on the local values."""
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), self.value)
        values = [_call_like(n, module, *fx.node.map_arg((n.args, n.kwargs), lambda a: self.example(a, whole)))
                  for whole in (False, True)]
        if any(isinstance(v, torch.Tensor) for v in pytree.tree_leaves(values[1])):
            self.env[n.name] = Local()  # split/chunk: each element is lowered at its getitem
            return
        self.env[n.name] = Local(self.emit(n, module, args, kwargs), value=values[0], full=values[1])

    def channelwise(self, n: fx.Node, module) -> None:
        x = n.all_input_nodes[0]
        loc = self.env[x.name]
        if loc.node is None:
            self.env[n.name] = Local(None, loc.units)
            return
        lay = self.low.layout(n)
        shape = lay.rep_shape(None if loc.units is None else loc.units.numel())
        in_shape = self.shapes[loc.node.name]
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            def part(t):
                return None if t is None else self.const(f"{n.name}_bn", t.detach()[loc.units])
            node = self.call(F.batch_norm, (loc.node, part(module.running_mean), part(module.running_var),
                                            part(module.weight), part(module.bias), False, 0.0, module.eps), shape=shape)
        elif module is not None and any(True for _ in module.parameters()):
            raise LoweringError(f"'{n.name}' ({type(module).__name__}) has per-channel parameters; lowering it "
                                f"is not built yet")
        elif _uneven_adaptive_avg_pool2d(n, module, in_shape, shape):
            # torch.onnx exports adaptive pooling only between sizes that divide: the same averages as matrices
            rows, cols = (self.const(f"{n.name}_pool", adaptive_pool_matrix(i, o, lay.dtype))
                          for i, o in zip(in_shape[-2:], shape[-2:]))
            node = self.call(pool_by_matrices, (loc.node, rows, cols), shape=shape, dtype=lay.dtype)
        else:
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: loc.node if a is x else self.value(a))
            node = self.emit(n, module, args, kwargs, shape, lay.dtype)
        self.hold(n, node, loc.units)

    def elementwise(self, n: fx.Node, module) -> None:
        lay = self.low.layout(n)
        split = [a for a in n.all_input_nodes if self.env[a.name].units is not None]
        for a in split:
            la = self.low.layout(a)
            if la.rep_shape(la.units)[la.axis:la.axis + 1] != lay.rep_shape(lay.units)[lay.axis:lay.axis + 1] or \
                    len(la.shape) != len(lay.shape):
                raise LoweringError(f"'{n.name}': inputs split along different layouts; not lowered yet")
        ref = self.env[split[0].name]
        if ref.node is None:
            self.env[n.name] = Local(None, ref.units)
            return
        units = ref.units

        def arg(a: fx.Node):
            loc = self.env[a.name]
            if loc.units is not None:
                return self.aligned(a, units)
            if loc.node is None:
                return loc.value
            shape = self.shapes[loc.node.name]
            axis = lay.axis - (len(lay.shape) - len(shape))  # broadcasting aligns dims from the right
            if len(lay.dims) == 1 and 0 <= axis and shape[axis] == lay.shape[lay.axis] and shape[axis] > 1:
                return self.select(loc.node, axis, units)
            if len(lay.dims) > 1 and tuple(shape) == lay.shape:  # units span several dims (after a pixel shuffle)
                return self.select(self.reshape(loc.node, lay.rep_shape(lay.units)), lay.axis, units)
            if axis >= 0 and any(s > 1 for s in shape[axis:axis + len(lay.dims)]):
                raise LoweringError(f"'{n.name}': a whole tensor broadcast over split channels; not lowered yet")
            return loc.node
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), arg)
        self.hold(n, self.emit(n, module, args, kwargs), units)

    # ------------------------------------------------------------ attention
    def attention(self, n: fx.Node) -> None:
        """The per-head core on the heads this node owns (whole heads: rules.attention ties them), with
        query, key and value aligned to one unit order; per-head tensors of windowed attention (relative
        position bias, logit scale: heads along dim -3) cut to those heads."""
        lay = self.low.layout(n)
        held = lay.held(self.j)
        if held.numel() == 0:
            self.env[n.name] = Local(None, held)
            return
        q, k, v, heads, *rest = n.args
        width = lay.units // heads
        blocks = held.reshape(-1, width) if held.numel() % width == 0 else None
        if blocks is None or bool((blocks != blocks[:, :1] + torch.arange(width)).any() | (blocks[:, 0] % width).any()):
            raise LoweringError(f"'{n.name}': node {self.j} holds part of an attention head")
        mine = blocks[:, 0] // width

        def per_head(a):
            node = self.value(a)
            return self.select(node, len(self.shapes[node.name]) - 3, mine) if isinstance(node, fx.Node) else node
        args = (*(self.aligned(a, held) for a in (q, k, v)), mine.numel(),
                *(per_head(a) if isinstance(a, fx.Node) else a for a in rest))
        kwargs = {key: per_head(a) if key == "logit_scale" else self.value(a) if isinstance(a, fx.Node) else a
                  for key, a in n.kwargs.items()}
        self.hold(n, self.call(n.target, args, kwargs, shape=lay.rep_shape(held.numel()), dtype=lay.dtype), held)

    # ------------------------------------------------------------ statistics over split channels
    def statistics(self, n: fx.Node, module) -> None:
        """LayerNorm, softmax, L2 normalisation, sum or mean over channels that several nodes hold: each holder
        computes per-row partial statistics, sends them, and every receiver merges them exactly."""
        x = n.all_input_nodes[0]
        lay, loc = self.low.layout(x), self.env[x.name]
        if bool((lay.owner == REPLICATED).any()):
            raise LoweringError(f"'{n.name}': statistics over channels that are partly replicated; not lowered yet")
        kind = _statistic_kind(n, module)
        holders = [k for k in range(self.low.nodes) if lay.owned(k).numel()]
        receivers = list(range(self.low.nodes)) if kind in ("sum", "mean") else holders
        if self.j not in receivers:
            self.env[n.name] = Local(None, loc.units)
            return
        dims = _local_dims(n, module, lay)
        stats_shape = {k: _stats_shape(lay.rep_shape(lay.owned(k).numel()), dims, kind) for k in holders}
        count = {k: int(torch.tensor([lay.rep_shape(lay.owned(k).numel())[d] for d in dims]).prod()) for k in holders}
        parts = {}
        if self.j in holders:
            parts[self.j] = self.call(_partial_stats, (loc.node, kind, dims), shape=stats_shape[self.j], dtype=lay.dtype)
            for dst in receivers:
                if dst != self.j:
                    msg = self.low.message("stats", n.name, self.j, dst, torch.arange(0), stats_shape[self.j], lay.dtype)
                    self.call(send, (msg.id, parts[self.j]))
        for src in holders:
            if src != self.j:
                msg = self.low.message("stats", n.name, src, self.j, torch.arange(0), stats_shape[src], lay.dtype)
                parts[src] = self.call(recv, (msg.id,), shape=stats_shape[src], dtype=lay.dtype)
        order = sorted(parts)
        merged = self.call(_merge_stats, ([parts[k] for k in order], [count[k] for k in order], kind),
                           shape=stats_shape[order[0]], dtype=lay.dtype)
        if kind in ("sum", "mean"):
            out = self.low.layout(n)
            node = self.call(_finish_reduction, (merged, kind, sum(count.values()), dims,
                                                 bool(_arg(n, 2, "keepdim", False))), shape=out.shape, dtype=out.dtype)
            self.env[n.name] = Local(node)
            return
        if kind == "layer_norm":
            eps = module.eps if module is not None else _arg(n, 4, "eps", 1e-5)
            args = [loc.node, merged, float(eps)]
            for k, name in ((2, "weight"), (3, "bias")):
                t = getattr(module, name) if module is not None else self.concrete_tensor(_arg(n, k, name))
                args.append(None if t is None else self.const(f"{n.name}_{name}", _local_affine(t.detach(), lay, loc.units, len(dims))))
            node = self.call(_normalise, tuple(args))
        elif kind == "normalize":
            node = self.call(_normalize_finish, (loc.node, merged, float(_arg(n, 3, "eps", 1e-12))))
        else:
            node = self.call(_softmax_finish, (loc.node, merged, kind))
        self.hold(n, node, loc.units)

    def concrete_tensor(self, a) -> torch.Tensor | None:
        if a is None or isinstance(a, torch.Tensor):
            return a
        if isinstance(a, fx.Node) and a.op == "get_attr":
            return operator.attrgetter(a.target)(self.low.gm)
        raise LoweringError(f"a normalisation whose weight is computed ('{a}'); not lowered yet")

    # ------------------------------------------------------------ data movement
    def relayout(self, n: fx.Node, module) -> None:
        lay = self.low.layout(n)
        held = lay.held(self.j)
        if held.numel() == 0:
            self.env[n.name] = Local(None, held)
            return
        producer = n
        if n.target is operator.getitem and not _is_tensor_meta(n.args[0].meta.get("tensor_meta")):
            producer = n.args[0]  # element `index` of a split/chunk
        inputs = [a for a in producer.all_input_nodes if _is_tensor_meta(a.meta.get("tensor_meta"))]
        ids, offset = {}, 0
        for a in inputs:
            la = self.low.layout(a)
            numel = int(torch.tensor(la.shape).prod())
            ids[a.name] = torch.arange(offset, offset + numel).reshape(la.shape)
            offset += numel

        def run(arg_of):
            args, kwargs = fx.node.map_arg((producer.args, producer.kwargs), arg_of)
            module_ = self.low.gm.get_submodule(producer.target) if producer.op == "call_module" else None
            out = _call_like(producer, module_, args, kwargs)
            return out[n.args[1]] if producer is not n else out

        expected = lay.as_rep(run(lambda a: ids[a.name] if a.name in ids else self.env[a.name].full))
        local_ids = {a.name: self.local_ids(a, ids[a.name]) for a in inputs}
        if producer is n:  # candidate 1: the op itself on the local tensors (parts this node lacks left out of lists)
            empty = {a.name for a in inputs if self.env[a.name].node is None}
            # candidate 1b: the same with whole inputs first narrowed to the held units along the output's channel
            # axis (a replicated class token concatenated beside split tokens takes their labels, rules.cat)
            narrowable = [a for a in inputs if self.env[a.name].units is None and a.name not in empty
                          and len(lay.dims) == 1 and len(self.low.layout(a).shape) == len(lay.shape)
                          and self.low.layout(a).shape[lay.axis] == lay.units]
            for narrow in ([], narrowable) if narrowable else ([],):
                ids_of = {**local_ids, **{a.name: ids[a.name].index_select(lay.axis, held) for a in narrow}}
                try:
                    args, kwargs = _without(fx.node.map_arg((n.args, n.kwargs), lambda a: ids_of.get(a.name, self.env[a.name].value)
                                                            if a.name not in empty else _EMPTY))
                    got = _call_like(n, module, args, kwargs)
                    # units spanning several dims (a pixel shuffle's channels x positions) are held flattened
                    natural = isinstance(got, torch.Tensor) and got.dim() == len(lay.shape) != expected.dim()
                    units = _match_units(expected, got.reshape(expected.shape[:lay.axis] + (-1,)) if natural else got,
                                         lay.axis)
                except (RuntimeError, ValueError, IndexError, TypeError):  # the op rejects the local shapes
                    units = None
                if units is not None and torch.equal(torch.sort(units).values, held):
                    nodes_of = {a.name: self.select(self.value(a), lay.axis, held) for a in narrow}
                    args, kwargs = _without(fx.node.map_arg((n.args, n.kwargs), lambda a: nodes_of.get(a.name, self.value(a))
                                                            if a.name not in empty else _EMPTY))
                    node = self.emit(n, module, args, kwargs, shape=tuple(got.shape) if natural else None)
                    self.hold(n, self.reshape(node, lay.rep_shape(units.numel())) if natural else node, units)
                    return
        if len(inputs) == 1 and self.low.layout(inputs[0]).axis is not None:  # candidate 2: a gather
            src = inputs[0]
            axis = self.low.layout(src).axis
            pos = _gather_positions(expected, held, local_ids[src.name], axis, lay.axis)
            if pos is not None:
                node = self.select(self.env[src.name].node, axis, pos)
                self.hold(n, self.reshape(node, lay.rep_shape(held.numel())), held)
                return
        raise LoweringError(f"'{n.name}' ({rules.describe_target(producer, module)}): no local form of this data "
                            f"movement on node {self.j}")

    def local_ids(self, a: fx.Node, full: torch.Tensor) -> torch.Tensor:
        loc = self.env[a.name]
        if loc.units is None:
            return full
        lay = self.low.layout(a)
        return lay.as_rep(full).index_select(lay.axis, loc.units)


# ---------------------------------------------------------------- statistics over split channels

_STATISTICS = {F.layer_norm: "layer_norm", nn.LayerNorm: "layer_norm", F.softmax: "softmax", torch.softmax: "softmax",
               "softmax": "softmax", nn.Softmax: "softmax", F.log_softmax: "log_softmax",
               torch.log_softmax: "log_softmax", "log_softmax": "log_softmax", nn.LogSoftmax: "log_softmax",
               torch.sum: "sum", "sum": "sum", torch.mean: "mean", "mean": "mean", F.normalize: "normalize"}


def _local_terms_first(prog: NodeProgram) -> None:
    """Reassociate sums so that terms needing no further message are added before those that do:
    (p + r) + z -> (p + z) + r when r waits for a message that p and z do not (z: a residual branch, p: the
    local partial sum of a Conv, r: a received partial sum). The new sum is placed right after p and z, so the
    cut (stages.py) puts it before the wait, and what runs after the message arrives is Conv + Add (+ Relu),
    one fused kernel in onnxruntime; the part of z computed after p in program order (a gather of the residual's
    rows, say) moves up with it. Exact in real arithmetic; fp32 rounding may differ in the last bits."""
    waits: dict[fx.Node, frozenset] = {}
    for node in prog.graph.nodes:
        waits[node] = frozenset({node} if node.op == "call_function" and node.target is recv else ()).union(
            *(waits[a] for a in node.all_input_nodes))
    while _reassociate_one(prog, waits):
        pass


def _is_add(node) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.add
            and len(node.args) == 2 and not node.kwargs)


def _reassociate_one(prog: NodeProgram, waits: dict[fx.Node, frozenset]) -> bool:
    """One rewrite of `_local_terms_first`; False when none applies."""
    order = {node: k for k, node in enumerate(prog.graph.nodes)}
    for outer in filter(_is_add, prog.graph.nodes):
        for inner, z in (outer.args, outer.args[::-1]):
            if not (_is_add(inner) and len(inner.users) == 1 and isinstance(z, fx.Node)):
                continue
            p, r = inner.args
            shape = prog.shapes.get(outer.name)
            if not (isinstance(p, fx.Node) and isinstance(r, fx.Node) and waits[z] <= waits[p]
                    and not waits[r] <= waits[p] and shape is not None
                    and prog.shapes.get(p.name) == prog.shapes.get(z.name) == shape):
                continue
            anchor = p
            for a in sorted(_ancestors_after(z, order[p], order), key=order.__getitem__):
                anchor.append(a)  # computed before the wait too
                anchor = a
            with prog.graph.inserting_after(anchor):
                local = prog.graph.call_function(operator.add, (p, z))
            prog.shapes[local.name], prog.dtypes[local.name] = shape, prog.dtypes[outer.name]
            waits[local] = waits[p]
            outer.args = (local, r)
            prog.graph.erase_node(inner)
            return True
    return False


def _ancestors_after(node: fx.Node, position: int, order: dict[fx.Node, int]) -> set[fx.Node]:
    """`node` and its ancestors that come after `position` in program order."""
    found, todo = set(), [node]
    while todo:
        a = todo.pop()
        if order[a] > position and a not in found:
            found.add(a)
            todo.extend(a.all_input_nodes)
    return found


def _statistic_kind(n: fx.Node, module) -> str:
    kind = _STATISTICS.get(type(module) if module is not None else n.target)
    if kind is None:
        raise LoweringError(f"'{n.name}' ({n.target}) reduces over channels split across nodes; lowering it is "
                            f"not built yet")
    return kind


def _arg(n: fx.Node, index: int, name: str, default=None):
    return n.args[index] if len(n.args) > index else n.kwargs.get(name, default)


def _local_dims(n: fx.Node, module, lay: Layout) -> tuple[int, ...]:
    """The reduced dims, in the local representation (channel dims collapsed into lay.axis)."""
    ndim = len(lay.shape)
    if isinstance(module, nn.LayerNorm) or n.target is F.layer_norm:
        k = len(module.normalized_shape if module is not None else _arg(n, 1, "normalized_shape"))
        full = range(ndim - k, ndim)
    elif isinstance(module, (nn.Softmax, nn.LogSoftmax)):
        full = [module.dim % ndim]
    elif n.target is F.normalize:
        full = [_arg(n, 2, "dim", 1) % ndim]
    else:
        dim = _arg(n, 1, "dim")
        full = range(ndim) if dim is None else [d % ndim for d in ((dim,) if isinstance(dim, int) else dim)]
    if not set(lay.dims) <= set(full):
        raise LoweringError(f"'{n.name}' reduces over part of the channel dims {lay.dims}; not lowered yet")
    shift = len(lay.dims) - 1
    return tuple(sorted({lay.axis if d in lay.dims else d - (shift if d > lay.axis else 0) for d in full}))


def _stats_shape(shape: tuple[int, ...], dims: tuple[int, ...], kind: str) -> tuple[int, ...]:
    reduced = tuple(1 if d in dims else s for d, s in enumerate(shape))
    return reduced + ((1,) if kind in ("sum", "mean", "normalize") else (2,))


def _local_affine(t: torch.Tensor, lay: Layout, units: torch.Tensor, k: int) -> torch.Tensor:
    """A LayerNorm weight (over the last dims) restricted to the held units."""
    rep = lay.rep_shape(lay.units)
    return t.reshape(rep[-k:]).index_select(lay.axis - (len(rep) - k), units)


def _partial_stats(x: torch.Tensor, kind: str, dims: tuple[int, ...]) -> torch.Tensor:
    """Per-row statistics of this node's part, stacked on a new last dim."""
    if kind == "layer_norm":
        mean = x.mean(dims, keepdim=True)
        return torch.stack([mean, ((x - mean) ** 2).sum(dims, keepdim=True)], -1)
    if kind in ("softmax", "log_softmax"):
        top = x.amax(dims, keepdim=True)
        return torch.stack([top, torch.exp(x - top).sum(dims, keepdim=True)], -1)
    if kind == "normalize":
        return x.square().sum(dims, keepdim=True).unsqueeze(-1)
    return x.sum(dims, keepdim=True).unsqueeze(-1)


def _merge_stats(parts: list[torch.Tensor], counts: list[int], kind: str) -> torch.Tensor:
    """Merge the nodes' partial statistics exactly: means and variances by Chan et al.'s
    pairwise formula, softmax maxima and sums by rescaling to the common maximum, sums by adding."""
    if kind == "layer_norm":
        total = float(sum(counts))
        mean = sum(p[..., 0] * c for p, c in zip(parts, counts)) / total
        m2 = sum(p[..., 1] + c * (p[..., 0] - mean) ** 2 for p, c in zip(parts, counts))
        return torch.stack([mean, m2 / total], -1)
    if kind in ("softmax", "log_softmax"):
        top = parts[0][..., 0]
        for p in parts[1:]:
            top = torch.maximum(top, p[..., 0])
        return torch.stack([top, sum(p[..., 1] * torch.exp(p[..., 0] - top) for p in parts)], -1)
    return sum(parts)


def _normalise(x, stats, eps: float, weight, bias):
    y = (x - stats[..., 0]) / torch.sqrt(stats[..., 1] + eps)
    if weight is not None:
        y = y * weight
    return y + bias if bias is not None else y


def _normalize_finish(x, stats, eps: float):
    """F.normalize (p=2) from the merged sum of squares."""
    return x / stats[..., 0].sqrt().clamp_min(eps)


def _softmax_finish(x, stats, kind: str):
    if kind == "log_softmax":
        return x - stats[..., 0] - torch.log(stats[..., 1])
    return torch.exp(x - stats[..., 0]) / stats[..., 1]


def _finish_reduction(merged, kind: str, total: int, dims: tuple[int, ...], keepdim: bool):
    out = merged[..., 0]
    if kind == "mean":
        out = out / total
    return out if keepdim else out.squeeze(dims)


_EMPTY = object()  # stands for an input of which this node holds nothing


def _without(tree):
    """Drop the _EMPTY parts from the lists and tuples of an argument structure."""
    if isinstance(tree, (list, tuple)):
        return type(tree)(_without(t) for t in tree if t is not _EMPTY)
    if isinstance(tree, dict):
        return {k: _without(v) for k, v in tree.items()}
    if tree is _EMPTY:
        raise TypeError("an input this node does not hold")
    return tree


def _uneven_adaptive_avg_pool2d(n: fx.Node, module, in_shape, out_shape) -> bool:
    if not (isinstance(module, nn.AdaptiveAvgPool2d) or n.target is F.adaptive_avg_pool2d):
        return False
    return len(in_shape) == 4 and any(i % o for i, o in zip(in_shape[-2:], out_shape[-2:]))


def adaptive_pool_matrix(size_in: int, size_out: int, dtype: torch.dtype) -> torch.Tensor:
    """(size_out, size_in): row i averages inputs floor(i*in/out) .. ceil((i+1)*in/out) - 1, as
    adaptive average pooling does."""
    m = torch.zeros(size_out, size_in, dtype=dtype)
    for i in range(size_out):
        start, end = (i * size_in) // size_out, -((-(i + 1) * size_in) // size_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def pool_by_matrices(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Adaptive average pooling of (..., H, W) as rows @ x @ cols^T."""
    return rows @ x @ cols.transpose(0, 1)


def _call_like(n: fx.Node, module, args, kwargs):
    if n.op == "call_method":
        return getattr(args[0], n.target)(*args[1:], **kwargs)
    if n.op == "call_module":
        return module(*args, **kwargs)
    return n.target(*args, **kwargs)


def _rows(t: torch.Tensor, axis: int) -> torch.Tensor:
    return t.movedim(axis, 0).reshape(t.shape[axis], -1)


def _match_units(expected: torch.Tensor, got, axis: int | None) -> torch.Tensor | None:
    """If `got` is exactly some units of `expected` (both in representation form), those units in order."""
    if not isinstance(got, torch.Tensor) or axis is None or got.dim() != expected.dim():
        return None
    if got.shape[:axis] != expected.shape[:axis] or got.shape[axis + 1:] != expected.shape[axis + 1:]:
        return None
    first = {int(v): u for u, v in enumerate(_rows(expected, axis)[:, 0])}
    units = torch.tensor([first.get(int(v), -1) for v in _rows(got, axis)[:, 0]], dtype=torch.long)
    if bool((units < 0).any()) or not torch.equal(expected.index_select(axis, units), got):
        return None
    return units


def _gather_positions(expected: torch.Tensor, held: torch.Tensor, src: torch.Tensor, src_axis: int,
                      out_axis: int) -> torch.Tensor | None:
    """Positions along the source's local axis whose slices are exactly the held output units."""
    want = _rows(expected.index_select(out_axis, held), out_axis)
    rows = _rows(src, src_axis)
    if rows.shape[1] != want.shape[1]:
        return None
    first = {int(v): k for k, v in enumerate(rows[:, 0])}
    pos = torch.tensor([first.get(int(v), -1) for v in want[:, 0]], dtype=torch.long)
    if bool((pos < 0).any()) or not torch.equal(rows[pos], want):
        return None
    return pos


def _is_marker(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in (recv, send, model_output)


def _prune(builders: list[NodeBuilder], messages: list[Message]) -> None:
    """Drop work that reaches no send and no model output. A message its receiver never uses
    (a channel kept for a layer whose rows on that node feed nothing) is dropped at both ends,
    which can leave more of the sender's work dead: repeat until nothing changes."""
    while True:
        for b in builders:
            b.g.eliminate_dead_code(is_impure_node=_is_marker)
        unused = {n.args[0]: (b, n) for b in builders for n in b.g.nodes if n.target is recv and not n.users}
        if not unused:
            return
        for b in builders:
            for n in list(b.g.nodes):
                if n.target is send and n.args[0] in unused:
                    b.g.erase_node(n)
        for b, n in unused.values():
            b.g.erase_node(n)
        messages[:] = [m for m in messages if m.id not in unused]


def lower(dm, exchange_messages: dict[str, list[Message]], gates: dict[str, torch.Tensor], *,
          overlap: bool = True) -> Lowered:
    """Per-node programs of `dm` (eval mode) for the hardened messages. `overlap`: compute local partial sums
    while messages are in flight (module docstring); False: one product over local and received channels."""
    low = Lowerer(dm.graph_module, dm.plan, exchange_messages, gates, overlap)
    builders = [NodeBuilder(low, j) for j in range(dm.plan.nodes)]
    with torch.no_grad():
        for n in dm.graph_module.graph.nodes:
            for b in builders:
                b.lower(n)
    for b in builders:
        b.g.output(None)
    _prune(builders, low.messages)
    for b in builders:
        _local_terms_first(b.program())
    placeholders = [n for n in dm.graph_module.graph.nodes if n.op == "placeholder"]
    inputs = [(n.name, low.layout(n).shape, low.layout(n).dtype) for n in placeholders]
    outputs = [(f"output{k}", low.layout(leaf).shape, low.layout(leaf).dtype) for k, leaf in enumerate(low.output_leaves)]
    return Lowered([b.program() for b in builders], low.messages, inputs, outputs, low.output_spec)

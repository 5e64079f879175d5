"""Lowering: turn a DISCO model with hardened gates into one program per node.

`lower` walks the DISCO graph once, and for every fx node each node's NodeBuilder writes what that node
computes of it (backend/program.py: the local representation). What an op computes on one node is its op
family's lowering (ops/: mixing with its block sum, channelwise, elementwise, statistics over split channels,
data movement, attention, replicate); this module holds what is shared: the builders' graph helpers, the
messages, model inputs and outputs (node 0 sends the input to the others at its input wire, unless every node
takes it itself, and receives the parts of the outputs it does not hold), values that every node holds whole,
and pruning of work that reaches no send and no output.
A message its receiver never uses (a channel kept for a layer whose rows on that node feed nothing) is dropped
at both ends. After pruning, sums are reassociated so that local terms come before received ones
(backend/reassociate.py).

A BatchNorm right after a conv whose only user it is folds into the conv's weights:
    W' = W * gamma / sqrt(var + eps),   b' = (b - mean) * gamma / sqrt(var + eps) + beta
"""
from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torch.utils import _pytree as pytree

from ..artifact.schedule import Message
from ..ir import MixingLayer
from ..ops import registry
from ..ops.registry import call_like
from ..ops import wire as wires
from ..ops.exchange import DECODES, decode, encode
from ..ops.movement import MOVEMENT
from ..ops.replicate import REPLICATE
from .harden import harden
from .program import (Layout, Local, Lowered, LoweringError, NodeProgram, is_marker, is_tensor_meta, model_output,
                      mutable_output, recv, send, wire_shape)
from .reassociate import local_terms_first


def _plain_batchnorm(module: nn.Module) -> bool:
    """A BatchNorm that computes only the normalisation (a subclass with an activation, as timm's
    BatchNormAct2d, overrides forward and is lowered as a channelwise op instead)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and \
        type(module).forward is nn.modules.batchnorm._BatchNorm.forward


class Lowerer:
    """Shared state of one lowering: layouts, messages, folded BatchNorms."""

    def __init__(self, gm: fx.GraphModule, plan, exchange_messages: dict[str, list[Message]],
                 gates: dict[str, torch.Tensor], overlap: bool = True, input_wires: dict | None = None):
        self.gm = gm
        self.input_wires = input_wires or {}  # model input name -> its InputWire (ops/modules.py)
        self.inputs_on_all_nodes = plan.input_on_all_nodes
        self.overlap = overlap
        self.nodes = plan.nodes
        self.batch = plan.batch
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
        leaves, self.output_spec = pytree.tree_flatten(mutable_output(out_node.args[0]))
        if not all(isinstance(leaf, fx.Node) for leaf in leaves):
            raise LoweringError("a model output that is not a tensor computed by the model")
        self.output_leaves: list[fx.Node] = leaves

    def layout(self, n: fx.Node) -> Layout:
        if n.name not in self._layouts:
            self._layouts[n.name] = Layout(n, self.batch)
        return self._layouts[n.name]

    def message(self, kind: str, tensor: str, src: int, dst: int, channels: torch.Tensor,
                shape: tuple[int, ...], dtype: torch.dtype, wire: str = "fp32") -> Message:
        """The message of this kind for (tensor, src, dst); made by whichever side asks first."""
        key = (kind, tensor, src, dst)
        if key not in self._keyed:
            travels = wire_shape(shape)
            numel = 1
            for s in travels[1:]:
                numel *= s
            msg = Message(id=f"{kind}{len(self.messages)}", src=src, dst=dst, kind=kind, tensor=tensor,
                          channels=[int(c) for c in channels], shape=travels,
                          dtype=str(dtype).replace("torch.", ""), bytes=numel * dtype.itemsize, wire=wire)
            self.messages.append(msg)
            self._keyed[key] = msg
        return self._keyed[key]

    def _foldable_batchnorms(self) -> dict[str, str]:
        """BatchNorm node -> the Conv node it directly follows (the conv's only user)."""
        folded = {}
        for n in self.gm.graph.nodes:
            if n.op != "call_module" or not _plain_batchnorm(self.gm.get_submodule(n.target)):
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
        self.gathers: dict[str, fx.Node] = {}  # split tensors gathered whole here for replicated ops
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

    def method(self, name: str, args: tuple, shape=None, dtype=torch.float32) -> fx.Node:
        return self._typed(self.g.call_method(name, args), shape, dtype)

    def select(self, x: fx.Node, axis: int, positions: torch.Tensor) -> fx.Node:
        shape = self.shapes[x.name]
        if axis is None:  # a tensor of one channel unit (no channel dim): its one unit is the whole tensor
            if not torch.equal(positions, torch.arange(1)):
                raise LoweringError(f"'{x.name}': units {positions.tolist()} of a tensor of one unit")
            return x
        if positions.numel() == shape[axis] and torch.equal(positions, torch.arange(positions.numel())):
            return x
        out = shape[:axis] + (positions.numel(),) + shape[axis + 1:]
        return self.call(torch.index_select, (x, axis, self.const("index", positions)), shape=out,
                         dtype=self.dtypes[x.name])

    def reshape(self, x: fx.Node, shape: tuple[int, ...]) -> fx.Node:
        if self.shapes[x.name] == shape:
            return x
        return self._typed(self.g.call_method("reshape", (x, (-1,) + tuple(shape[1:]))), shape, self.dtypes[x.name])

    def send(self, msg: Message, payload: fx.Node) -> None:
        """Send `payload` as `msg`; rows folded into dim 0 with the batch travel as a dim of their own
        (program.wire_shape)."""
        shape = self.shapes[payload.name]
        if shape[0] != 1:
            payload = self._typed(self.g.call_method("reshape", (payload, (-1, *shape))), (1, *shape),
                                  self.dtypes[payload.name])
        self.call(send, (msg.id, payload), shape=None)

    def receive(self, msg: Message, shape: tuple[int, ...], dtype: torch.dtype) -> fx.Node:
        """The payload of `msg`, of local per-sample shape `shape` (the inverse of `send`)."""
        if shape[0] == 1:
            return self.call(recv, (msg.id,), shape=shape, dtype=dtype)
        node = self.call(recv, (msg.id,), shape=(1, *shape), dtype=dtype)
        return self._typed(self.g.call_method("reshape", (node, (-1, *shape[1:]))), shape, dtype)

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
        if is_tensor_meta(a.meta.get("tensor_meta")):
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


    def lower(self, n: fx.Node) -> None:
        """Node j's part of `n`: graph plumbing here, every op through its family's lowering (ops/)."""
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
        if n.name in self.low.folded:  # a BatchNorm folded into the conv before it (Lowerer.weights)
            self.env[n.name] = self.env[n.all_input_nodes[0].name]
            return
        if n.name in self.low.replicated:
            return REPLICATE.lowering(self, n, module, None)
        if n.target is operator.getitem and not is_tensor_meta(n.args[0].meta.get("tensor_meta")) \
                and is_tensor_meta(n.meta.get("tensor_meta")):
            if self.env[n.args[0].name].node is not None:  # a value of a replicated op with several
                return self.whole(n, module)
            return MOVEMENT.lowering(self, n, module, None)  # an element of a split/chunk
        op = registry.lookup(n, module)
        if n.name in self.low.stats:  # statistics over split channels (of one value or several)
            return op.lower(self, n, module)
        if not is_tensor_meta(n.meta.get("tensor_meta")):
            return self.structural(n, module)
        if self.low.layout(n).owner is None and all(self.env[a.name].units is None for a in n.all_input_nodes):
            return self.whole(n, module)
        if op is None:
            raise LoweringError(f"'{n.name}' ({registry.describe_target(n, module)}) is split across nodes but "
                                f"has no op family")
        return op.lower(self, n, module)

    def submodule(self, n: fx.Node, module: nn.Module, args, kwargs, shape=None, dtype=None) -> fx.Node:
        """A call of `module` (a copy made for this node, e.g. with its per-channel parameters sliced)."""
        name = f"m_{n.name}"
        self.root.add_module(name, module)
        return self._typed(self.g.call_module(name, args, kwargs), shape, dtype)

    # ------------------------------------------------------------ inputs and outputs
    def placeholder(self, n: fx.Node) -> None:
        """Node 0 takes the model input and sends it to the others at its input wire; every node, node 0
        included, computes from the value decoded (ops/modules.InputWire). With the input on all nodes, each
        takes it itself."""
        lay = self.low.layout(n)
        if self.low.inputs_on_all_nodes:
            self.env[n.name] = Local(self._typed(self.g.placeholder(n.name), lay.shape, lay.dtype))
            return
        iw = self.low.input_wires.get(n.target)
        wire, scale, axis = ("fp32", None, None) if iw is None else (iw.wire, iw.scale, iw.axis)
        sent, dtype = wires.payload(lay.shape, lay.dtype, wire)
        if self.j == 0:
            x = self._typed(self.g.placeholder(n.name), lay.shape, lay.dtype)
            payload = encode(self, wire, scale, axis, x, lay.dtype)
            for dst in range(1, self.low.nodes):
                self.send(self.low.message("input", n.name, 0, dst, torch.arange(0), sent, dtype, wire), payload)
        else:
            msg = self.low.message("input", n.name, 0, self.j, torch.arange(0), sent, dtype, wire)
            payload = self.receive(msg, sent, dtype)
        self.env[n.name] = Local(decode(self, wire, scale, axis, payload, lay.shape, lay.dtype))

    def batch_of_inputs(self) -> fx.Node:
        """(batch,) zeros, from the first model input (which node j holds or receives): a batch dimension
        for values that depend on no input."""
        first = next(n for n in self.low.gm.graph.nodes if n.op == "placeholder")
        x = self.env[first.name].node
        flat = self.method("flatten", (x, 1), shape=(1, int(torch.tensor(self.shapes[x.name][1:]).prod())))
        return self.call(operator.getitem, (flat, (slice(None), 0)), shape=(1,), dtype=self.dtypes[x.name])

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
                self.send(msg, payload)

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
            parts.append(self.receive(msg, lay.rep_shape(theirs.numel()), lay.dtype))
            order.append(theirs)
        units = torch.cat(order)
        rep = lay.rep_shape(units.numel())
        cat = parts[0] if len(parts) == 1 else self.call(torch.cat, (parts, lay.axis), shape=rep, dtype=lay.dtype)
        return self.reshape(self.select(cat, lay.axis, torch.argsort(units)), lay.shape)


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
                value = call_like(n, module, *fx.node.map_arg((n.args, n.kwargs), constant))
            self.env[n.name] = Local(self.const(n.name, value))
            return
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), self.whole_value)
        lay = self.low.layout(n)
        self.env[n.name] = Local(self.emit(n, module, args, kwargs, lay.shape, lay.dtype))

    def whole_value(self, a: fx.Node):
        """An argument of an op computed whole: a size read off a split tensor (its channel count, local on a
        node) is its whole-model value; sizes a node shares with the whole model (the batch) stay computed."""
        loc = self.env[a.name]
        if loc.node is not None and loc.full is not None and loc.value != loc.full:
            return loc.full
        return self.value(a)


    def structural(self, n: fx.Node, module) -> None:
        """Non-tensor values (sizes and arithmetic on them): computed on the local values."""
        def evaluated(whole: bool):
            return call_like(n, module, *fx.node.map_arg((n.args, n.kwargs), lambda a: self.example(a, whole)))
        full = evaluated(True)
        if any(isinstance(v, torch.Tensor) for v in pytree.tree_leaves(full)):
            if all(self.env[a.name].units is None for a in n.all_input_nodes):  # pieces of a whole tensor
                self.env[n.name] = Local(self.emit(n, module, *fx.node.map_arg((n.args, n.kwargs), self.value)))
            else:
                self.env[n.name] = Local()  # split/chunk (of sizes that may not fit the local tensor): at each getitem
            return
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), self.value)
        self.env[n.name] = Local(self.emit(n, module, args, kwargs), value=evaluated(False), full=full)


    def concrete_tensor(self, a) -> torch.Tensor | None:
        if a is None or isinstance(a, torch.Tensor):
            return a
        if isinstance(a, fx.Node) and a.op == "get_attr":
            return operator.attrgetter(a.target)(self.low.gm)
        raise LoweringError(f"a normalisation whose weight is computed ('{a}'); not lowered yet")


def _prune(builders: list[NodeBuilder], messages: list[Message]) -> list[Message]:
    """Drop work that reaches no send and no model output, and return the messages still sent. A message its
    receiver never uses is dropped at both ends, which can leave more of the sender's work dead: repeat until
    nothing changes."""
    dropped: set[str] = set()
    while True:
        for b in builders:
            b.g.eliminate_dead_code(is_impure_node=is_marker)
        unused = {n.args[0]: (b, n) for b in builders for n in b.g.nodes if n.target is recv and not n.users}
        if not unused:
            return [m for m in messages if m.id not in dropped]
        for b in builders:
            for n in list(b.g.nodes):
                if n.target is send and n.args[0] in unused:
                    b.g.erase_node(n)
        for b, n in unused.values():
            b.g.erase_node(n)
        dropped |= set(unused)


def _decode_where_used(g: fx.Graph) -> None:
    """Move each node that decodes a received payload (ops/exchange.py DECODES) to just before its first user,
    so that a node computes what it can before it waits for the message (stages.py cuts where it waits)."""
    for n in reversed([n for n in g.nodes if n.meta.get(DECODES) and n.users]):
        order = {m: k for k, m in enumerate(g.nodes)}
        min(n.users, key=order.__getitem__).prepend(n)


def lower_model(dm, *, overlap: bool = True) -> Lowered:
    """harden, then lower: the per-node programs of `dm` (in eval mode) for its current gate selection."""
    messages, gates = harden(dm)
    return lower(dm, messages, gates, overlap=overlap)


def lower(dm, exchange_messages: dict[str, list[Message]], gates: dict[str, torch.Tensor], *,
          overlap: bool = True) -> Lowered:
    """Per-node programs of `dm` (eval mode) for the hardened messages. `overlap`: compute local partial sums
    while messages are in flight (module docstring); False: one product over local and received channels."""
    low = Lowerer(dm.graph_module, dm.plan, exchange_messages, gates, overlap, dict(dm.input_wires))
    builders = [NodeBuilder(low, j) for j in range(dm.plan.nodes)]
    with torch.no_grad():
        for n in dm.graph_module.graph.nodes:
            for b in builders:
                b.lower(n)
    for b in builders:
        b.g.output(None)
    messages = _prune(builders, low.messages)
    for b in builders:
        local_terms_first(b.program())
        _decode_where_used(b.g)
    placeholders = [n for n in dm.graph_module.graph.nodes if n.op == "placeholder"]
    inputs = [(n.name, low.layout(n).shape, low.layout(n).dtype) for n in placeholders]
    outputs = [(f"output{k}", low.layout(leaf).shape, low.layout(leaf).dtype)
               for k, leaf in enumerate(low.output_leaves)]
    return Lowered([b.program() for b in builders], messages, inputs, outputs, low.output_spec)

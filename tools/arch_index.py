"""Write disco_compile/frontend/arch_index.json, the signatures frontend/arch_match.py matches state_dicts against.

    python tools/arch_index.py                   # every torchvision classification architecture and every timm one
    python tools/arch_index.py --source timm     # one source again (after upgrading it); the other's is kept

Every architecture is built once with its defaults, on the meta device where it can be (arch_match.shapes_of).
Its head, the tensors whose shape follows num_classes: for torchvision, the tensors whose first dimension changes
when it is built a second time for one more class; for timm, the tensors of `model.get_classifier()` whose first
dimension is `model.num_classes` (one build of each of 1,371 architectures is about half an hour here). An
architecture that cannot be built is listed under "skipped" with the reason. The file is written every 100
architectures, so an interrupted run leaves what it did; `--resume` keeps those entries.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torchvision

from disco_compile.frontend import arch_match

OUT = Path(arch_match.__file__).with_name(arch_match.INDEX_FILE)
VARIANTS = {"googlenet": [{}, {"aux_logits": False}], "inception_v3": [{}, {"aux_logits": False}]}
CLASSES = 1000  # torchvision's default num_classes
SAVE_EVERY = 100


def torchvision_entry(name: str, kwargs: dict) -> dict:
    _, shapes = arch_match.shapes_of("torchvision", name, kwargs)
    _, more = arch_match.shapes_of("torchvision", name, {**kwargs, "num_classes": CLASSES + 1})
    head = {k for k in shapes if shapes[k] != more[k]}
    if not all(shapes[k][0] == CLASSES and more[k] == (CLASSES + 1, *shapes[k][1:]) for k in head):
        head = set()  # num_classes changes more than a head's first dimension: not read off the shapes
    return arch_match.signature(name, kwargs, shapes, head)


def timm_entry(name: str, kwargs: dict) -> dict:
    model, shapes = arch_match.shapes_of("timm", name, kwargs)
    heads = model.get_classifier() if hasattr(model, "get_classifier") else ()
    heads = {id(h) for h in (heads if isinstance(heads, tuple) else (heads,))}
    prefixes = tuple(f"{n}." for n, m in model.named_modules() if n and id(m) in heads)
    classes = getattr(model, "num_classes", None)
    head = {k for k, s in shapes.items() if prefixes and k.startswith(prefixes) and s and s[0] == classes}
    return arch_match.signature(name, kwargs, shapes, head)


def architectures(source: str) -> list[tuple[str, dict]]:
    if source == "timm":
        import timm
        return [(name, {}) for name in timm.list_models()]
    names = sorted(torchvision.models.list_models(module=torchvision.models))
    return [(name, kwargs) for name in names for kwargs in VARIANTS.get(name, [{}])]


def write(sections: dict) -> None:
    """One entry per line: the file diffs entry by entry when a source is re-indexed."""
    parts = []
    for source, section in sections.items():
        entries = ",\n".join(json.dumps(e, separators=(",", ":")) for e in section["entries"])
        rest = {k: v for k, v in section.items() if k != "entries"}
        parts.append(f"{json.dumps(source)}: {json.dumps(rest)[:-1]}, \"entries\": [\n{entries}]}}")
    OUT.write_text("{" + ",\n".join(parts) + "}\n")


def index_source(source: str, sections: dict, resume: bool) -> None:
    make = timm_entry if source == "timm" else torchvision_entry
    old = sections.get(source, {}) if resume else {}
    done = {(e["name"], json.dumps(e["kwargs"])) for e in old.get("entries", [])}
    section = {"version": arch_match.installed(source), "entries": list(old.get("entries", [])),
               "skipped": dict(old.get("skipped", {}))}
    sections[source] = section
    todo = [(n, k) for n, k in architectures(source) if (n, json.dumps(k)) not in done and n not in section["skipped"]]
    start = time.perf_counter()
    for i, (name, kwargs) in enumerate(todo, 1):
        try:
            section["entries"].append(make(name, kwargs))
        except Exception as exc:  # an architecture its library cannot build with defaults: listed, not indexed
            section["skipped"][name] = f"{type(exc).__name__}: {exc}"[:200]
        if i % SAVE_EVERY == 0 or i == len(todo):
            write(sections)
            print(f"{source}: {i}/{len(todo)} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    section["entries"].sort(key=lambda e: (e["name"], json.dumps(e["kwargs"])))
    write(sections)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=arch_match.SOURCES, action="append",
                        help="index this source again (repeat for both; default: both)")
    parser.add_argument("--resume", action="store_true", help="keep the entries the file holds; index the rest")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sections = json.loads(OUT.read_text()) if OUT.exists() else {}
    for source in args.source or arch_match.SOURCES:
        index_source(source, sections, args.resume)
    write({s: sections[s] for s in arch_match.SOURCES if s in sections})


if __name__ == "__main__":
    main()

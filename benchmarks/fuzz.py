"""The long fuzz of the loaders: manifest.json, schedule.json (sha256 recomputed and not), peers files and .npy
records, each for --examples inputs (default 10,000), drawn by the hypothesis strategies of tests/test_fuzz.py
and checked by its targets ("named error or correct output", test_fuzz.py's docstring).

Every input ends as one of: named (a DiscoError), ok (the correct output), wrong (the output disagrees: an
AssertionError of the check), traceback (any other exception: the first of each type is printed), or hang
(no answer within --hang seconds, stopped by SIGALRM). The counts go to the section between the `fuzz`
markers of docs/reliability.md (rewritten after each loader); the rest of that file is kept.

    python benchmarks/fuzz.py                      # 10^4 inputs per loader
    python benchmarks/fuzz.py --examples 2000 --only peers.yaml
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _perfdoc  # noqa: E402
from test_fuzz import targets  # noqa: E402

DOC = ROOT / "docs" / "reliability.md"
OUTCOMES = ("ok", "named", "wrong", "traceback", "hang")


class _Hang(BaseException):
    """SIGALRM: the input took longer than --hang seconds."""


def _alarm(signum, frame):
    raise _Hang()


def fuzz(target, examples: int, hang: float) -> tuple[Counter, dict[str, str], float]:
    """Counts of each outcome over `examples` inputs, the first traceback of each exception type, seconds."""
    counts, first = Counter(), {}

    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(target.strategy)
    def one(value):
        signal.setitimer(signal.ITIMER_REAL, hang)
        try:
            counts[target.check(value)] += 1
        except _Hang:
            counts["hang"] += 1
        except AssertionError:
            counts["wrong"] += 1
            first.setdefault("wrong", f"{value!r:.300}\n{traceback.format_exc(limit=3)}")
        except Exception as exc:  # noqa: BLE001 counting raw tracebacks is the point
            counts["traceback"] += 1
            first.setdefault(type(exc).__name__, f"{value!r:.300}\n{traceback.format_exc(limit=6)}")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    start = time.perf_counter()
    one()
    return counts, first, time.perf_counter() - start


_TABLE = ["| loader | inputs | correct output | named error | wrong answer | raw traceback | hang | seconds |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]


def _rows(rows: list[tuple[str, Counter, float]]) -> list[str]:
    return [f"| {name} | {sum(counts.values())} | " + " | ".join(str(counts[o]) for o in OUTCOMES)
            + f" | {seconds:.0f} |" for name, counts, seconds in rows]


def write(rows: list[tuple[str, Counter, float]], examples: int, hang: float, started: str) -> None:
    """Put `rows` into the section between the fuzz markers of docs/reliability.md (appended if absent): the
    rows of loaders not run now are kept, as is the rest of the file; the run (started at `started`) is listed
    under the table, once."""
    text = DOC.read_text() if DOC.exists() else "# Reliability\n"
    begin, end = "<!-- fuzz -->", "<!-- /fuzz -->"
    found = re.search(re.escape(begin) + r"\n(.*?)" + re.escape(end), text, re.S)
    old = found.group(1).splitlines() if found else []
    names = {name for name, _, _ in rows}
    kept = [line for line in old if line.startswith("| ") and not line.startswith("| loader")
            and line.split(" | ")[0][2:] not in names]
    run = f"- `{_perfdoc.command()}` started {started}"
    runs = [line for line in old if line.startswith("- ") and not line.startswith(run)]
    runs.append(f"{run} ({', '.join(sorted(names))}): up to {examples} "
                f"inputs per loader, a hang is no answer within {hang:g} s; {_perfdoc.machine()}, load "
                f"{_perfdoc.load()}")
    body = "\n".join([*_TABLE, *kept, *_rows(rows), "", "Runs:", *runs]) + "\n"
    block = f"{begin}\n{body}{end}"
    text = text[:found.start()] + block + text[found.end():] if found else text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = DOC.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, DOC)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000, help="inputs per loader")
    parser.add_argument("--hang", type=float, default=10.0, help="seconds after which an input counts as a hang")
    parser.add_argument("--only", action="append", help="run only the loaders of these names (repeat)")
    parser.add_argument("--no-write", action="store_true", help="print the counts, do not write docs/reliability.md")
    args = parser.parse_args()
    signal.signal(signal.SIGALRM, _alarm)
    started = _perfdoc.today()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for target in targets(Path(tmp)):
            if args.only and target.name not in args.only:
                continue
            counts, first, seconds = fuzz(target, args.examples, args.hang)
            rows.append((target.name, counts, seconds))
            print(f"{target.name}: {dict(counts)} in {seconds:.0f} s", flush=True)
            for kind, text in first.items():
                print(f"  first {kind}:\n{text}", flush=True)
            if not args.no_write:  # after each loader: a run stopped early keeps what it counted
                write(rows, args.examples, args.hang, started)
    print("\n".join([*_TABLE, *_rows(rows)]))


if __name__ == "__main__":
    main()

"""What an export is: the settings that made it and, per layer, who owns what, what is sent and what is computed.

Read from manifest.json (`settings`, `layers`: written at export, backend/layers.py) and schedule.json, with no
torch. A layer row is one op of the DISCO graph named by the original model's module path: a channel-mixing
layer (Conv, Linear) or an op whose output is sent. For N nodes it holds

    channels[j]   units of the op's output owned by node j (None: replicated on every node)
    macs[j]       multiply-accumulates node j computes for it, per sample
    sent[i][j]    bytes per sample node i sends node j of the op's output (exchange, gather and stats messages)

Totals: exchange bytes = sum of sent over rows = the schedule's exchange, gather and stats messages; io bytes =
its input messages (node 0 -> k) plus its output messages (k -> 0); MACs per node = sum of macs over rows. The
totals are recomputed from schedule.json, so an export without per-layer records (made before they existed)
still shows them, and its rows are the sent tensors by DISCO graph name.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .bundle import Bundle
from ..errors import DiscoError

EXCHANGE_KINDS = ("exchange", "gather", "stats")


class InfoError(DiscoError):
    """`disco-run info` cannot do what it was asked (e.g. --plot without matplotlib)."""


@dataclass(frozen=True)
class Layer:
    name: str  # module path in the original model ("layer1.0.conv1")
    op: str  # module class or function ("Conv2d", "add")
    channels: list[int] | None
    macs: list[int]
    sent: list[list[int]]

    @property
    def sent_bytes(self) -> int:
        return sum(map(sum, self.sent))


@dataclass(frozen=True)
class Summary:
    """Everything `disco-run info` shows; `as_json` for machines."""
    export: str
    nodes: int
    model_hash: str
    created_by: str
    settings: dict
    layers: list[Layer]
    exchange_bytes: list[list[int]]  # [i][j]: bytes per sample node i sends node j inside the model
    input_bytes: int
    output_bytes: int
    stages: list[int]  # stage graphs per node
    per_layer: bool  # whether manifest.json has per-layer records (else the rows are the sent tensors)

    @property
    def macs(self) -> list[int]:
        return [sum(layer.macs[j] for layer in self.layers) for j in range(self.nodes)]

    def as_json(self) -> dict:
        data = asdict(self)
        data.update(macs_per_node=self.macs, io_bytes=self.input_bytes + self.output_bytes,
                    total_exchange_bytes=sum(map(sum, self.exchange_bytes)))
        return data


def summarize(bundle: Bundle) -> Summary:
    """The Summary of a loaded export."""
    manifest, schedule = bundle.manifest, bundle.schedule
    n = schedule.nodes
    exchange = [[0] * n for _ in range(n)]
    by_tensor: dict[str, list[list[int]]] = {}
    io = {"input": 0, "output": 0}
    for m in schedule.messages:
        if m.kind in EXCHANGE_KINDS:
            exchange[m.src][m.dst] += m.bytes
            by_tensor.setdefault(m.tensor, [[0] * n for _ in range(n)])[m.src][m.dst] += m.bytes
        else:
            io[m.kind] += m.bytes
    if manifest.layers is not None:
        layers = [Layer(**row) for row in manifest.layers]
    else:
        layers = [Layer(name=t, op="(sent)", channels=None, macs=[0] * n, sent=s) for t, s in by_tensor.items()]
    return Summary(export=str(bundle.root), nodes=n, model_hash=manifest.model_hash, created_by=manifest.created_by,
                   settings=manifest.settings or {}, layers=layers, exchange_bytes=exchange,
                   input_bytes=io["input"], output_bytes=io["output"], stages=[len(p) for p in schedule.programs],
                   per_layer=manifest.layers is not None)


# ---------------------------------------------------------------- text

def si(value: float, unit: str = "") -> str:
    """`value` with a k/M/G prefix and three significant digits: 1.23 M."""
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip() if value else "0"


def _directions(nodes: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(nodes) for j in range(nodes) if i != j]


def _settings_lines(s: Summary) -> list[str]:
    st = s.settings
    lines = [f"export    {s.export} ({s.created_by}), model hash {s.model_hash[:16]}..."]
    if not st:
        return lines + ["settings  not recorded (exported before disco-compile stored them; re-export to see them)"]
    model = st.get("model") or {}
    lines.append(f"model     {model.get('description', '(not recorded)')}"
                 + (f", input {'x'.join(map(str, model['input_shape']))}" if model.get("input_shape") else "")
                 + (f", weights sha256 {model['weights_sha256'][:16]}..." if model.get("weights_sha256") else ""))
    weights = st.get("node_weights")
    shares = "equal shares" if not weights else "weights " + ", ".join(f"{w:g}" for w in weights)
    lines.append(f"nodes     {s.nodes} ({shares}); stages per node {', '.join(map(str, s.stages))}; "
                 f"overlap {'on' if st.get('overlap') else 'off'}")
    budget = st.get("budget")
    lines.append("budget    none (every channel sent)" if not budget else
                 f"budget    rho {budget['rho']:g}, allocation {budget['allocation']}, align {budget['align']}, "
                 f"compute weight {budget['compute_weight']:g}")
    if st.get("wire"):
        lines.append(f"wire      {st['wire']}")
    tuned = st.get("finetune")
    if tuned:
        quality = tuned.get("quality") or {}
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in quality.items())
        lines.append(f"finetuned {tuned['steps']} steps on {tuned.get('data') or '(data not recorded)'}"
                     + (f"; measured {shown}" if shown else ""))
    else:
        lines.append("finetuned no (one-shot selection)" if budget else "finetuned no")
    return lines


def _table(s: Summary) -> list[str]:
    n = s.nodes
    pairs = _directions(n)
    by_direction = len(pairs) <= 6
    heads = ["layer", "op", "channels", "MACs per node"] + ([f"{i}->{j} B" for i, j in pairs] if by_direction
                                                             else ["sent B"])
    rows = []
    for layer in [*s.layers, None]:
        if layer is None:
            name, op, channels = "total (exchange)", "", ""
            macs, sent = s.macs, s.exchange_bytes
        else:
            name, op = layer.name, layer.op
            channels = "all" if layer.channels is None else "/".join(map(str, layer.channels))
            macs, sent = layer.macs, layer.sent
        cells = [name, op, channels, "/".join(si(m) for m in macs) if any(macs) else "-"]
        cells += [si(sent[i][j]) for i, j in pairs] if by_direction else [si(sum(map(sum, sent)))]
        rows.append(cells)
    widths = [max(len(str(r[c])) for r in [heads, *rows]) for c in range(len(heads))]

    def line(cells):
        return "  ".join(str(x).ljust(w) if c < 2 else str(x).rjust(w)
                         for c, (x, w) in enumerate(zip(cells, widths, strict=True))).rstrip()
    return [line(heads), line(["-" * w for w in widths]), *map(line, rows[:-1]),
            line(["-" * w for w in widths]), line(rows[-1])]


def render(s: Summary) -> str:
    """The text `disco-run info` prints: settings, the per-layer table, totals and the io bytes."""
    exchange = sum(map(sum, s.exchange_bytes))
    io = s.input_bytes + s.output_bytes
    comm = exchange + io
    lines = _settings_lines(s) + [""]
    if not s.per_layer:
        lines.append("(no per-layer records in manifest.json: rows are the sent tensors by DISCO graph name, "
                     "without MACs; re-export for module paths and MACs)")
    lines += _table(s) + [
        "",
        f"exchange  {si(exchange, 'B')} per sample between nodes inside the model",
        f"io        {si(io, 'B')} per sample (input node 0 -> others {si(s.input_bytes, 'B')}, "
        f"outputs to node 0 {si(s.output_bytes, 'B')})"
        + (f": {io / comm:.0%} of the {si(comm, 'B')} communicated" if comm else ""),
        f"MACs      {' / '.join(si(m) for m in s.macs)} per node (sum {si(sum(s.macs))})"]
    return "\n".join(lines)


# ---------------------------------------------------------------- picture

def plot(s: Summary, path: Path) -> None:
    """Draw bytes sent per layer and direction (top) and MACs per layer and node (bottom) into `path` (PNG)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise InfoError(f"--plot {path}: drawing needs matplotlib, which is not installed here; install it with "
                        f"pip install 'disco-compile[plot]' (or pip install matplotlib), or leave out --plot") from exc
    names = [layer.name for layer in s.layers]
    x = list(range(len(names)))
    pairs = _directions(s.nodes)
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(max(8.0, 0.16 * len(names) + 2), 7.5))
    width = 0.8 / max(1, len(pairs))
    for k, (i, j) in enumerate(pairs):
        top.bar([p - 0.4 + width * (k + 0.5) for p in x], [layer.sent[i][j] for layer in s.layers], width,
                label=f"node {i} -> {j}")
    top.set_ylabel("bytes sent per sample")
    title = (s.settings.get("model") or {}).get("source") or Path(s.export).name
    budget = s.settings.get("budget")
    title += f" at budget {budget['rho']:g}" if budget else ""
    top.set_title(f"{title}: {s.nodes} nodes, exchange {si(sum(map(sum, s.exchange_bytes)), 'B')}, "
                  f"io {si(s.input_bytes + s.output_bytes, 'B')} per sample")
    top.legend(fontsize="small")
    width = 0.8 / s.nodes
    for j in range(s.nodes):
        bottom.bar([p - 0.4 + width * (j + 0.5) for p in x], [layer.macs[j] for layer in s.layers], width,
                   label=f"node {j}")
    bottom.set_ylabel("MACs per sample")
    bottom.legend(fontsize="small")
    bottom.set_xticks(x, names, rotation=90, fontsize=max(4, min(8, math.floor(600 / max(1, len(names))))))
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise InfoError(f"--plot {path}: cannot be written ({exc})") from exc
    finally:
        plt.close(fig)

"""Reading a benchmark run back: rows, speedups, the markdown table and the plot.

The input is pytest-benchmark's JSON (``--benchmark-json``). A benchmark is
tabulated when its ``extra_info`` names ``case`` (a label of the shape),
``dtype``, ``mode`` and ``provider``; it may add ``bytes_moved`` (bytes that
must move), ``input_bytes``, ``copy_gbps``, ``peak_memory_bytes`` and
``saved_bytes``. The time is pytest-benchmark's own median. Speedups are
recomputed here from the medians of the same run, against the ``eager`` and
``compile`` providers of the same (case, dtype, mode), so a run filtered with
``-k`` still reads right. Any benchmark file that fills those keys (a model's
training step, say) is reported the same way.
"""
import json
import math
from dataclasses import dataclass
from typing import Optional

from . import metrics
from .cases import PROVIDERS
from .environment import slug

MiB = 1 << 20


class MissingDependencyError(RuntimeError):
    """An optional dependency the request needs is not installed; the message says how to get it."""


@dataclass
class Row:
    case: str
    dtype: str
    mode: str
    provider: str
    median_s: float
    bytes_moved: Optional[int] = None
    input_bytes: Optional[int] = None
    copy_gbps: Optional[float] = None
    peak_memory_bytes: Optional[int] = None
    saved_bytes: Optional[int] = None
    speedup_vs_eager: Optional[float] = None
    speedup_vs_compile: Optional[float] = None

    @property
    def key(self):
        return (self.case, self.dtype, self.mode)

    @property
    def gbps(self):
        return metrics.effective_gbps(self.bytes_moved, self.median_s)

    @property
    def pct_of_copy(self):
        return metrics.percent_of(self.gbps, self.copy_gbps)


def load(path):
    with open(path) as f:
        return json.load(f)


def rows_from_json(data):
    """One row per tabulated benchmark, grouped by case in run order, baselines first."""
    rows = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if not all(k in info for k in ("case", "dtype", "mode", "provider")):
            continue
        rows.append(Row(
            case=info["case"], dtype=info["dtype"], mode=info["mode"], provider=info["provider"],
            median_s=bench["stats"]["median"],
            bytes_moved=info.get("bytes_moved"), input_bytes=info.get("input_bytes"),
            copy_gbps=info.get("copy_gbps"), peak_memory_bytes=info.get("peak_memory_bytes"),
            saved_bytes=info.get("saved_bytes")))
    add_speedups(rows)
    first_seen = {}
    for row in rows:
        first_seen.setdefault(row.key, len(first_seen))
    return sorted(rows, key=lambda r: (first_seen[r.key], _provider_rank(r.provider)))


def _provider_rank(provider):
    return (PROVIDERS.index(provider), "") if provider in PROVIDERS else (len(PROVIDERS), provider)


def add_speedups(rows):
    """Fill each row's speedups against the eager and compile rows of its (case, dtype, mode)."""
    baselines = {}
    for row in rows:
        if row.provider in ("eager", "compile"):
            baselines.setdefault(row.key, {})[row.provider] = row.median_s
    for row in rows:
        base = baselines.get(row.key, {})
        row.speedup_vs_eager = metrics.speedup(base.get("eager"), row.median_s)
        row.speedup_vs_compile = metrics.speedup(base.get("compile"), row.median_s)
    return rows


def run_info(data):
    """The run's environment, copy bandwidth and skipped providers (from the conftest's section)."""
    section = data.get("sa_kernels", {})
    env = dict(section.get("environment") or {})
    if not env:  # a JSON from another harness: fall back on the first benchmark's extra_info
        for bench in data.get("benchmarks", []):
            info = bench.get("extra_info", {})
            if "device_name" in info:
                env = {k: info.get(k) for k in ("device", "device_name", "torch", "triton", "cuda",
                                                "date")}
                break
    if not env.get("date") and data.get("datetime"):
        env["date"] = data["datetime"][:10]
    env.setdefault("device_name", data.get("machine_info", {}).get("cpu", {}).get("brand_raw")
                   or "unknown device")
    return {"environment": env, "copy_bandwidth": section.get("copy_bandwidth"),
            "skipped": section.get("skipped", {})}


def output_stem(info):
    """``<device-slug>-<YYYY-MM-DD>``, e.g. ``nvidia-h100-80gb-hbm3-2026-11-25``."""
    env = info["environment"]
    return f"{slug(env.get('device_name') or 'unknown')}-{env.get('date') or 'undated'}"


def _three_digits(value):
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def format_time(seconds):
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{_three_digits(seconds * 1e6)} us"
    if seconds < 1:
        return f"{_three_digits(seconds * 1e3)} ms"
    return f"{_three_digits(seconds)} s"


def format_bytes(nbytes):
    return "-" if nbytes is None else f"{nbytes / MiB:.1f} MiB"


def _fmt(value, spec, suffix=""):
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _saved(row):
    if row.saved_bytes is None:
        return "-"
    if row.input_bytes:
        return f"{format_bytes(row.saved_bytes)} ({row.saved_bytes / row.input_bytes:.2f}x in)"
    return format_bytes(row.saved_bytes)


TABLE_HEADER = ("shape", "dtype", "mode", "provider", "median", "GB/s", "% copy",
                "vs eager", "vs compile", "peak mem", "saved for bwd")


def format_table(rows):
    """A markdown table, one line per (case, provider); a case's shape/dtype/mode shown once."""
    lines = ["| " + " | ".join(TABLE_HEADER) + " |",
             "|" + "|".join("---" if i < 4 else "---:" for i in range(len(TABLE_HEADER))) + "|"]
    previous = None
    for row in rows:
        case_cells = ("", "", "") if row.key == previous else row.key
        previous = row.key
        cells = case_cells + (
            row.provider, format_time(row.median_s), _fmt(row.gbps, ".1f"),
            _fmt(row.pct_of_copy, ".1f", "%"), _fmt(row.speedup_vs_eager, ".2f", "x"),
            _fmt(row.speedup_vs_compile, ".2f", "x"), format_bytes(row.peak_memory_bytes),
            _saved(row))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_report(data, rows=None):
    """The whole markdown report: where it ran, the table, and what was not measured."""
    rows = rows_from_json(data) if rows is None else rows
    info = run_info(data)
    env = info["environment"]
    out = [f"# Shuffle Attention benchmarks: {env.get('device_name')}", ""]
    versions = ", ".join(f"{name} {env[name]}" for name in ("torch", "triton", "cuda")
                         if env.get(name))
    out.append(f"- date: {env.get('date')}; {versions}")
    copy = info["copy_bandwidth"]
    if copy:
        out.append(f"- copy bandwidth (measured in this run): {copy['gbps']:.1f} GB/s "
                   f"({copy.get('method', '')})")
    out.append("- median per step; GB/s = bytes that must move (forward 2x the input, "
               "forward+backward 5x) over the median; vs eager / vs compile = their median "
               "over this one (higher is faster)")
    out += ["", format_table(rows) if rows else "No benchmark results in this run."]
    if info["skipped"]:
        out += ["", "Not measured:"]
        out += [f"- {provider}: {reason}" for provider, reason in sorted(info["skipped"].items())]
    return "\n".join(out) + "\n"


def require_matplotlib():
    """matplotlib's Figure and Agg canvas, or a MissingDependencyError saying how to install it."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise MissingDependencyError(
            "the benchmark plot needs matplotlib, which is not installed: "
            "pip install 'sa-kernels[bench]' (or pip install matplotlib), "
            "or pass --no-plot for the table alone") from e
    return Figure, FigureCanvasAgg


def _color(provider):
    """One colour per provider in every panel (matplotlib's default cycle, by provider order)."""
    rank = PROVIDERS.index(provider) if provider in PROVIDERS else len(PROVIDERS)
    return f"C{rank % 10}"


def _bar_panel(ax, cases, providers, values, title, ylabel, reference=None, reference_label=None,
               log=False):
    ax.set_title(title)
    if not any(values.get((case, p)) for case in cases for p in providers):
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    width = 0.8 / max(1, len(providers))
    for i, provider in enumerate(providers):
        xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(cases))]
        ys = [values.get((case, provider)) for case in cases]
        ys = [math.nan if y is None else y for y in ys]
        if log:  # speedups: bars grow up from 1 when faster, down when slower
            ax.bar(xs, [y - 1 for y in ys], width, bottom=1.0, label=provider,
                   color=_color(provider))
        else:
            ax.bar(xs, ys, width, label=provider, color=_color(provider))
    if log:  # 2x faster and 2x slower sit the same distance from 1
        ax.set_yscale("log")
    if reference is not None:
        ax.axhline(reference, color="black", linestyle="--", linewidth=1, label=reference_label)
    ax.set_ylabel(ylabel)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([f"{case}\n{dtype}" for case, dtype in cases], rotation=30, ha="right",
                       fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)


def write_plot(rows, path, title=""):
    """A PNG: for each mode, speedup vs eager, speedup vs compile and effective bandwidth per shape."""
    Figure, FigureCanvasAgg = require_matplotlib()
    modes = list(dict.fromkeys(r.mode for r in rows))
    if not modes:
        raise ValueError("no benchmark rows to plot")
    ncases = max(len({(r.case, r.dtype) for r in rows if r.mode == m}) for m in modes)
    fig = Figure(figsize=(max(8.0, 0.7 * ncases + 2), 3.4 * 3 * len(modes)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3 * len(modes), 1, squeeze=False)[:, 0]
    copy_gbps = next((r.copy_gbps for r in rows if r.copy_gbps), None)
    for i, mode in enumerate(modes):
        mine = [r for r in rows if r.mode == mode]
        cases = list(dict.fromkeys((r.case, r.dtype) for r in mine))
        providers = list(dict.fromkeys(r.provider for r in mine))

        def values(attr):
            return {((r.case, r.dtype), r.provider): getattr(r, attr) for r in mine}
        ax_eager, ax_compile, ax_bw = axes[3 * i:3 * i + 3]
        _bar_panel(ax_eager, cases, [p for p in providers if p != "eager"],
                   values("speedup_vs_eager"), f"{mode}: speedup vs eager", "x faster (log)",
                   reference=1.0, log=True)
        _bar_panel(ax_compile, cases, [p for p in providers if p not in ("eager", "compile")],
                   values("speedup_vs_compile"), f"{mode}: speedup vs torch.compile",
                   "x faster (log)", reference=1.0, log=True)
        _bar_panel(ax_bw, cases, providers, values("gbps"), f"{mode}: effective bandwidth",
                   "GB/s", reference=copy_gbps,
                   reference_label=None if copy_gbps is None else "copy bandwidth")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=100)
    return path

"""Reading a benchmark run back: rows, comparisons, the markdown tables, the targets and the plot.

The input is the run's JSON: the file the suite rewrites after every case (``--sa-json``) or
pytest-benchmark's own (``--benchmark-json``); both hold ``benchmarks`` entries whose
``extra_info`` names ``provider``, ``mode`` and ``wall_us`` (kernel rows also ``case``,
``dtype``, ``layout``; model rows ``kind: "model"``). Every comparison (% of copy, speedups
against eager and compile, multiples of the copy and of GroupNorm, SA's cost over the no-SA
network) is recomputed here from the times of the same run, so a run filtered with ``-k``
or stopped part-way still reads right. Several JSONs (a kernel run and a model run, say) can
be merged into one report.
"""
import json
import math
from dataclasses import dataclass, field
from typing import Optional

from . import metrics
from .cases import PROVIDERS
from .environment import slug
from .models import MODEL_PROVIDERS

MiB = 1 << 20


class MissingDependencyError(RuntimeError):
    """An optional dependency the request needs is not installed; the message says how to get it."""


@dataclass
class Row:
    """One measured case and provider: its two times, and the comparisons filled in by the report."""
    info: dict
    wall_s: float
    device_s: Optional[float] = None
    derived: dict = field(default_factory=dict)
    run: int = 0  # which of the merged runs it is from

    def __getattr__(self, name):
        info = self.__dict__.get("info", {})
        derived = self.__dict__.get("derived", {})
        if name in derived:
            return derived[name]
        if name in info:
            return info[name]
        raise AttributeError(name)

    @property
    def is_model(self):
        return self.info.get("kind") == "model"

    @property
    def key(self):
        """The case: everything but the provider."""
        i = self.info
        if self.is_model:
            return ("model", i.get("mode"), i.get("batch"), i.get("image"), i.get("layout"),
                    i.get("precision"), self.run)
        return ("kernel", i.get("case"), i.get("dtype"), i.get("layout", "nchw"), i.get("mode"), self.run)

    @property
    def family(self):
        """The kernel case without its mode (where its ``copy`` is)."""
        return self.key[:4] + (self.run,)

    def get(self, name, default=None):
        try:
            return getattr(self, name)
        except AttributeError:
            return default


def load(path):
    with open(path) as f:
        return json.load(f)


def merge(datas):
    """One run's data from several JSONs: every benchmark, the first environment, all skips."""
    if len(datas) == 1:
        return datas[0]
    merged = {"datetime": datas[0].get("datetime"), "machine_info": {}, "benchmarks": [],
              "sa_kernels": {}}
    section = merged["sa_kernels"]
    for run, data in enumerate(datas):
        # Each benchmark keeps its run's index: rows are compared within their own run.
        merged["benchmarks"] += [dict(bench, sa_run=run) for bench in data.get("benchmarks", [])]
        own = data.get("sa_kernels", {})
        for key, value in own.items():
            if key == "skipped":
                for provider, reasons in _skips(value).items():
                    mine = section.setdefault("skipped", {}).setdefault(provider, [])
                    mine += [r for r in reasons if r not in mine]
            elif key == "complete":
                section["complete"] = section.get("complete", True) and bool(value)
            elif key in ("elapsed_s", "rows"):
                section[key] = (section.get(key) or 0) + (value or 0)
            else:
                section.setdefault(key, value)
    return merged


def _skips(value):
    """``{provider: [reasons]}`` (older runs wrote one reason per provider)."""
    return {p: [r] if isinstance(r, str) else list(r) for p, r in (value or {}).items()}


def rows_from_json(data):
    """Kernel rows then model rows, each grouped by case in run order, providers in run order."""
    rows = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "provider" not in info or "mode" not in info:
            continue
        wall_s = info["wall_us"] * 1e-6 if info.get("wall_us") is not None \
            else bench.get("stats", {}).get("median")
        if wall_s is None:
            continue
        device_s = None if info.get("device_us") is None else info["device_us"] * 1e-6
        rows.append(Row(info, wall_s, device_s, run=bench.get("sa_run", 0)))
    copy = data.get("sa_kernels", {}).get("copy_bandwidth") or {}
    add_comparisons(rows, copy.get("gbps"))
    first_seen = {}
    for row in rows:
        first_seen.setdefault(row.key, len(first_seen))
    return sorted(rows, key=lambda r: (r.is_model, first_seen[r.key], _provider_rank(r)))


def _provider_rank(row):
    order = MODEL_PROVIDERS if row.is_model else PROVIDERS
    provider = row.info["provider"]
    return (order.index(provider), "") if provider in order else (len(order), provider)


def add_comparisons(rows, copy_gbps=None):
    """Fill each row's comparisons from the times of its case's other providers in the run;
    % of copy against ``copy_gbps`` (the run's large copy) where the case's copy was not run."""
    times = {}
    for row in rows:
        times[(row.key, row.info["provider"])] = (row.wall_s, row.device_s)
        if row.info["provider"] == "copy" and not row.is_model:
            times[(row.family, "copy")] = (row.wall_s, row.device_s)
    for row in rows:
        if row.is_model:
            row.derived = _model_comparisons(row, times)
            continue
        refs = {p: times[(row.key, p)] for p in ("eager", "compile", "groupnorm")
                if (row.key, p) in times}
        if (row.family, "copy") in times:
            refs["copy"] = times[(row.family, "copy")]
        moved = row.info.get("bytes_moved")
        input_bytes = row.info.get("input_bytes")
        if moved is None and input_bytes is not None:
            moved = metrics.bytes_moved(input_bytes, row.info["mode"])
        row.derived = metrics.comparisons(row.wall_s, row.device_s, moved, input_bytes or 0,
                                          refs, copy_gbps)
        row.derived["gbps_wall"] = metrics.effective_gbps(moved, row.wall_s)
        row.derived["gbps_device"] = metrics.effective_gbps(moved, row.device_s)
    return rows


def _model_comparisons(row, times):
    out = {}
    for clock, index, t in (("wall", 0, row.wall_s), ("device", 1, row.device_s)):
        floor = times.get((row.key, "no-sa"))
        floor_t = None if floor is None else floor[index]
        out[f"sa_cost_us_{clock}"] = None if floor_t is None or t is None else (t - floor_t) * 1e6
        out[f"sa_cost_pct_{clock}"] = (None if floor_t is None or t is None
                                       else metrics.percent_of(t - floor_t, floor_t))
        eager = times.get((row.key, "eager"))
        out[f"speedup_vs_eager_{clock}"] = metrics.speedup(
            None if eager is None else eager[index], t)
    batch = row.info.get("batch")
    out["images_per_s"] = batch / row.wall_s if batch and row.wall_s else None
    return out


def run_info(data):
    """The run's environment, copy bandwidth, skipped providers, options and completeness."""
    section = data.get("sa_kernels", {})
    env = dict(section.get("environment") or {})
    if not env:  # a JSON from another harness: fall back on the first benchmark's extra_info
        for bench in data.get("benchmarks", []):
            info = bench.get("extra_info", {})
            if "device_name" in info:
                env = {k: info.get(k) for k in ("device", "device_name", "torch", "triton", "cuda",
                                                "date", "cpu_threads")}
                break
    if not env.get("date") and data.get("datetime"):
        env["date"] = data["datetime"][:10]
    env.setdefault("device_name", data.get("machine_info", {}).get("cpu", {}).get("brand_raw")
                   or "unknown device")
    return {"environment": env, "copy_bandwidth": section.get("copy_bandwidth"),
            "skipped": _skips(section.get("skipped")), "options": section.get("options", {}),
            "complete": section.get("complete"), "elapsed_s": section.get("elapsed_s"),
            "prewarm": section.get("prewarm"), "launch_us": section.get("launch_us")}


def output_stem(info):
    """``<device-slug>-<YYYY-MM-DD>``, plus ``-t<threads>`` on a CPU: ``cpu-...-2026-11-28-t1``."""
    env = info["environment"]
    stem = f"{slug(env.get('device_name') or 'unknown')}-{env.get('date') or 'undated'}"
    if env.get("device") == "cpu" and env.get("cpu_threads"):
        stem += f"-t{env['cpu_threads']}"
    return stem


def _three_digits(value):
    """Three significant digits (as rounded, so 99.99999 reads 100, not 100.0)."""
    if round(value, 2) < 10:
        return f"{value:.2f}"
    return f"{value:.1f}" if round(value, 1) < 100 else f"{value:.0f}"


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


def _pair(row, name, spec, suffix, with_device):
    """``wall / device`` of a comparison (wall alone where no row of the run has a device time)."""
    wall = _fmt(row.get(f"{name}_wall"), spec, suffix)
    if not with_device:
        return wall
    device = _fmt(row.get(f"{name}_device"), spec, suffix)
    return "-" if wall == device == "-" else f"{wall} / {device}"


def _saved(row):
    saved, input_bytes = row.get("saved_bytes"), row.get("input_bytes")
    if saved is None:
        return "-"
    if input_bytes:
        return f"{format_bytes(saved)} ({saved / input_bytes:.2f}x in)"
    return format_bytes(saved)


def _has_device_time(rows):
    return any(r.device_s is not None for r in rows)


def _table(header, right_from, lines):
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" if i < right_from else "---:" for i in range(len(header))) + "|"]
    return out + ["| " + " | ".join(cells) + " |" for cells in lines]


def kernel_header(with_device):
    both = " (wall / device)" if with_device else " (wall)"
    return ("shape", "dtype", "layout", "mode", "provider", "wall", "device", "launches",
            "% copy" + both, "vs eager" + both, "vs compile" + both, "x copy" + both,
            "x GroupNorm" + both, "peak mem", "saved for bwd")


def format_kernel_table(rows, with_device=None):
    """One line per (case, provider); a case's shape, dtype, layout and mode shown once."""
    rows = [r for r in rows if not r.is_model]
    with_device = _has_device_time(rows) if with_device is None else with_device
    lines, previous = [], None
    for row in rows:
        i = row.info
        case_cells = ("", "", "", "") if row.key == previous else (
            str(i.get("case")), str(i.get("dtype")), str(i.get("layout", "nchw")), str(i["mode"]))
        previous = row.key
        lines.append(case_cells + (
            i["provider"], format_time(row.wall_s), format_time(row.device_s),
            _fmt(i.get("launches"), "g"),
            _pair(row, "pct_copy", ".1f", "%", with_device),
            _pair(row, "speedup_vs_eager", ".2f", "x", with_device),
            _pair(row, "speedup_vs_compile", ".2f", "x", with_device),
            _pair(row, "x_copy", ".2f", "x", with_device),
            _pair(row, "x_groupnorm", ".2f", "x", with_device),
            format_bytes(i.get("peak_bytes", i.get("peak_memory_bytes"))), _saved(row)))
    return "\n".join(_table(kernel_header(with_device), 5, lines))


def model_header(with_device):
    return ("step", "layout", "precision", "provider", "wall / step", "device / step",
            "images/s", "peak mem", "SA cost (wall)", "SA cost (device)",
            "vs eager (wall / device)" if with_device else "vs eager (wall)")


def _cost(row, clock):
    us, pct = row.get(f"sa_cost_us_{clock}"), row.get(f"sa_cost_pct_{clock}")
    if us is None:
        return "-"
    return f"{us / 1e3:+.2f} ms ({pct:+.0f}%)" if pct is not None else f"{us / 1e3:+.2f} ms"


def format_model_table(rows):
    rows = [r for r in rows if r.is_model]
    with_device = _has_device_time(rows)
    lines, previous = [], None
    for row in rows:
        i = row.info
        step = f"{i['mode']}, batch {i.get('batch')}, {i.get('image')}x{i.get('image')}"
        case_cells = ("", "", "") if row.key == previous else (
            step, str(i.get("layout")), str(i.get("precision")))
        previous = row.key
        provider = i["provider"]
        if i.get("sa_backend") and provider.startswith("compile-"):
            provider += f" ({i['sa_backend']})"
        lines.append(case_cells + (
            provider, format_time(row.wall_s), format_time(row.device_s),
            _fmt(row.get("images_per_s"), ".0f"), format_bytes(i.get("peak_bytes")),
            "-" if i["provider"] == "no-sa" else _cost(row, "wall"),
            "-" if i["provider"] == "no-sa" else _cost(row, "device"),
            _pair(row, "speedup_vs_eager", ".2f", "x", with_device)))
    return "\n".join(_table(model_header(with_device), 4, lines))


@dataclass(frozen=True)
class Target:
    """One of issue 10's targets: ``field`` of the matching rows must be ``op`` ``value``."""
    name: str
    device: str
    mode: str
    field: str
    op: str
    value: float
    shapes: str = "all"  # "tiny" | "seed" | "all" (all but the host-cost case) | "planes>=28x28"

    def matches(self, row):
        i = row.info
        if row.is_model or i.get("device") != self.device or i["mode"] != self.mode:
            return False
        if i["provider"] not in ("cuda", "triton", "cpu", "torch"):
            return False
        name = str(i.get("case", "")).split(" ")[0]
        if self.shapes in ("tiny", "seed"):
            return name == self.shapes
        if name == "tiny":
            return False
        if self.shapes == "planes>=28x28":
            shape = i.get("shape") or [0, 0, 0, 0]
            return shape[2] * shape[3] >= 28 * 28
        return True

    def met(self, value):
        return value <= self.value if self.op == "<=" else value >= self.value


TARGETS = (
    Target("host cost: forward <= 1.5x nn.GroupNorm", "cpu", "forward", "x_groupnorm_wall", "<=", 1.5, "tiny"),
    Target("host cost: fwd+bwd <= 1.5x nn.GroupNorm", "cpu", "forward+backward", "x_groupnorm_wall", "<=", 1.5, "tiny"),
    Target("forward >= 3x eager", "cpu", "forward", "speedup_vs_eager_wall", ">=", 3.0),
    Target("forward >= 1.5x compile", "cpu", "forward", "speedup_vs_compile_wall", ">=", 1.5),
    Target("fwd+bwd >= 2x eager", "cpu", "forward+backward", "speedup_vs_eager_wall", ">=", 2.0),
    Target("fwd+bwd >= 1.2x compile", "cpu", "forward+backward", "speedup_vs_compile_wall", ">=", 1.2),
    Target("forward <= 2x copy_ (planes >= 28x28)", "cpu", "forward", "x_copy_wall", "<=", 2.0, "planes>=28x28"),
    Target("GPU host cost: forward <= 1.5x nn.GroupNorm (wall)", "cuda", "forward", "x_groupnorm_wall", "<=", 1.5, "seed"),
    Target("GPU host cost: step <= 1.5x nn.GroupNorm (wall)", "cuda", "forward+backward", "x_groupnorm_wall", "<=", 1.5, "seed"),
)


def evaluate_targets(rows, targets=TARGETS):
    """``(target, provider, met, measured, worst value, worst row)`` per target and fused provider."""
    results = []
    for target in targets:
        by_provider = {}
        for row in rows:
            value = row.get(target.field)
            if target.matches(row) and value is not None:
                by_provider.setdefault(row.info["provider"], []).append((value, row))
        for provider, found in by_provider.items():
            worst = (max if target.op == "<=" else min)(found, key=lambda f: f[0])
            met = sum(target.met(v) for v, _ in found)
            results.append((target, provider, met, len(found), worst[0], worst[1]))
    return results


def format_targets(rows):
    results = evaluate_targets(rows)
    if not results:
        return None
    lines = []
    for target, provider, met, measured, worst, row in results:
        i = row.info
        where = f"{i.get('case')} {i.get('dtype')} {i.get('layout', 'nchw')}"
        lines.append((target.name, provider, f"{met} / {measured}", f"{worst:.2f}x", where))
    return "\n".join(_table(("target (issue 10)", "provider", "rows met", "worst", "worst case"),
                            2, lines))


def format_report(data, rows=None):
    """The whole markdown report: where and how it ran, the tables, the targets, what was skipped."""
    rows = rows_from_json(data) if rows is None else rows
    info = run_info(data)
    env, options = info["environment"], info["options"]
    out = [f"# Shuffle Attention benchmarks: {env.get('device_name')}", ""]
    versions = ", ".join(f"{name} {env[name]}" for name in ("torch", "triton", "cuda")
                         if env.get(name))
    out.append(f"- date: {env.get('date')}; {versions}")
    threads = options.get("threads", env.get("cpu_threads"))
    if threads is not None:
        how = "torch's default" if options.get("threads_option") is None else "--sa-threads"
        cores = f" of {env['cpu_cores']} cores" if env.get("cpu_cores") else ""
        isa = f"; kernels for {env['cpu_capability']}" if env.get("cpu_capability") else ""
        out.append(f"- CPU threads: {threads} ({how}){cores}{isa}")
    if info["complete"] is False:
        out.append(f"- **incomplete run**: stopped after {len(data.get('benchmarks', []))} "
                   f"cases ({info['elapsed_s'] or 0:.0f} s); the rows below are what it finished")
    elif info["elapsed_s"] is not None:
        out.append(f"- run time: {info['elapsed_s']:.0f} s")
    copy = info["copy_bandwidth"]
    if copy:
        out.append(f"- large copy bandwidth (measured in this run): {copy['gbps']:.1f} GB/s "
                   f"({copy.get('method', '')})")
    if options:
        out.append(f"- shapes: {options.get('shapes')}; models: {options.get('models')}; "
                   f"torch.compile: {options.get('compile')} "
                   f"(backend {options.get('compile_backend', 'inductor')})")
    launch = info["launch_us"]
    if launch and launch.get("end") is not None:
        out.append(f"- host cost of one tiny launch: {launch['start']:.1f} us at the start, "
                   f"{launch['end']:.1f} us at the end")
    out.append("- wall = time per call, calls back to back (CUDA events on a GPU); device = the "
               "summed duration of the kernels, memsets and copies a call ran (torch.profiler; "
               "GPU only); launches = device activities per call (GPU) or operator calls per "
               "call (CPU)")
    out.append("- % copy = bytes that must move (forward 2x the input, forward+backward 5x) per "
               "second against a copy_ of the same input; vs eager / vs compile = their time "
               "over this one (higher is faster); x copy / x GroupNorm = this time over the "
               "copy_'s / nn.GroupNorm's (lower is faster)")
    kernel_rows = [r for r in rows if not r.is_model]
    model_rows = [r for r in rows if r.is_model]
    if not rows:
        out += ["", "No benchmark results in this run."]
    if kernel_rows:
        out += ["", "## Kernels", "", format_kernel_table(kernel_rows)]
    if model_rows:
        out += ["", "## End to end: SA-ResNet-50", "",
                "SA cost = the step's time over the same network without SA (no-sa).", "",
                format_model_table(model_rows)]
    targets = format_targets(rows)
    if targets:
        out += ["", "## Targets", "", targets]
    if info["skipped"]:
        out += ["", "Not measured:"]
        for provider, reasons in sorted(info["skipped"].items()):
            out += [f"- {provider}: {reason}" for reason in reasons]
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


def _color(provider, order=PROVIDERS):
    """One colour per provider in every panel (matplotlib's default cycle, by provider order)."""
    rank = order.index(provider) if provider in order else len(order)
    return f"C{rank % 10}"


def _bar_panel(ax, groups, providers, values, title, ylabel, markers=None, reference=None,
               log=False, order=PROVIDERS):
    """Bars per (group, provider) from ``values``; ``markers`` (same keys) drawn as black dots."""
    ax.set_title(title, fontsize=9)
    if not any(values.get((g, p)) for g in groups for p in providers):
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    width = 0.8 / max(1, len(providers))
    for i, provider in enumerate(providers):
        xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(groups))]
        ys = [values.get((g, provider)) for g in groups]
        ys = [math.nan if y is None else y for y in ys]
        if log:  # speedups: bars grow up from 1 when faster, down when slower
            ax.bar(xs, [y - 1 for y in ys], width, bottom=1.0, label=provider,
                   color=_color(provider, order))
        else:
            ax.bar(xs, ys, width, label=provider, color=_color(provider, order))
        if markers:
            ms = [markers.get((g, provider)) for g in groups]
            ax.plot(xs, [math.nan if m is None else m for m in ms], "k.", markersize=4)
    if log:  # 2x faster and 2x slower sit the same distance from 1
        ax.set_yscale("log")
    if reference is not None:
        ax.axhline(reference, color="black", linestyle="--", linewidth=1)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(["\n".join(str(p) for p in g) for g in groups], rotation=30, ha="right",
                       fontsize=6)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=6)


def write_plot(rows, path, title=""):
    """A PNG: per kernel mode, speedups vs eager and compile and % of copy per case (bars: device
    time where measured, else wall; dots: wall); then the models' time per step (bars: wall)."""
    Figure, FigureCanvasAgg = require_matplotlib()
    kernel = [r for r in rows if not r.is_model]
    model = [r for r in rows if r.is_model]
    modes = list(dict.fromkeys(r.info["mode"] for r in kernel))
    if not modes and not model:
        raise ValueError("no benchmark rows to plot")
    clock = "device" if _has_device_time(kernel) else "wall"
    npanels = 3 * len(modes) + (1 if model else 0)
    ncases = max([len({r.key for r in kernel if r.info["mode"] == m}) for m in modes]
                 + [len({r.key for r in model})])
    fig = Figure(figsize=(max(8.0, 0.55 * ncases + 2), 3.2 * npanels), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(npanels, 1, squeeze=False)[:, 0])
    for mode in modes:
        mine = [r for r in kernel if r.info["mode"] == mode]
        groups = list(dict.fromkeys(r.key[1:4] for r in mine))
        providers = list(dict.fromkeys(r.info["provider"] for r in mine))

        def values(name, which):
            return {(r.key[1:4], r.info["provider"]): r.get(f"{name}_{which}") for r in mine}
        dots = (lambda name: values(name, "wall")) if clock == "device" else (lambda name: None)
        for name, what, ylabel, ref, log, skip in (
                ("speedup_vs_eager", "speedup vs eager", "x faster (log)", 1.0, True,
                 ("eager", "copy", "groupnorm")),
                ("speedup_vs_compile", "speedup vs torch.compile", "x faster (log)", 1.0, True,
                 ("eager", "compile", "copy", "groupnorm")),
                ("pct_copy", "% of a copy_'s bandwidth", "%", 100.0, False, ("groupnorm",))):
            _bar_panel(axes.pop(0), groups, [p for p in providers if p not in skip],
                       values(name, clock), f"{mode}: {what} ({clock} time; dots: wall)"
                       if clock == "device" else f"{mode}: {what} (wall time)", ylabel,
                       markers=dots(name), reference=ref, log=log)
    if model:
        groups = list(dict.fromkeys(r.key[1:6] for r in model))
        providers = list(dict.fromkeys(r.info["provider"] for r in model))
        _bar_panel(axes.pop(0), groups, providers,
                   {(r.key[1:6], r.info["provider"]): r.wall_s * 1e3 for r in model},
                   "SA-ResNet-50: ms per step (bars: wall; dots: device)", "ms",
                   markers={(r.key[1:6], r.info["provider"]): None if r.device_s is None
                            else r.device_s * 1e3 for r in model},
                   order=MODEL_PROVIDERS)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=100)
    return path

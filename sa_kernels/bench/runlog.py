"""A benchmark run written as it goes: one JSON file rewritten after every finished case.

A run stopped part-way (a time limit, Ctrl-C, a crash) leaves a valid JSON of the cases it
finished: the file is replaced atomically (written beside, then renamed), so a reader never
sees half a file. Its layout is pytest-benchmark's (``benchmarks``: name, group, extra_info,
stats in seconds), plus the ``sa_kernels`` section the report reads (environment, copy
bandwidth, skipped providers, options), with ``complete`` true once the session ended.
"""
import datetime
import json
import math
import os
import time
from pathlib import Path

FORMAT = "sa-kernels-bench/2"
STATS_KEYS = ("min", "max", "mean", "stddev", "median", "iqr", "rounds", "iterations")


def _jsonable(value):
    """Floats that JSON can hold (NaN and infinities become null); anything unknown as text."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def benchmark_row(name, fullname, group, extra_info, stats, iterations=None):
    """A ``benchmarks`` entry: ``stats`` is pytest-benchmark's Stats (or a dict of its fields)."""
    if not isinstance(stats, dict):
        stats = {k: getattr(stats, k, None) for k in STATS_KEYS}
    stats = {k: stats.get(k) for k in STATS_KEYS if k in stats}
    if iterations is not None:
        stats["iterations"] = iterations
    return {"name": name, "fullname": fullname, "group": group,
            "extra_info": dict(extra_info), "stats": stats}


class RunLog:
    """The run's rows and its ``sa_kernels`` section, rewritten to ``path`` after each change."""

    def __init__(self, path, info=None):
        self.path = Path(path)
        self.info = info if info is not None else {}
        self.rows = []
        self._start = time.monotonic()
        self._datetime = datetime.datetime.now(datetime.timezone.utc).isoformat()

    @property
    def elapsed_s(self):
        return time.monotonic() - self._start

    def add(self, row):
        self.rows.append(row)
        self.write()

    def data(self, complete=False):
        section = dict(self.info, complete=complete, elapsed_s=round(self.elapsed_s, 3),
                       rows=len(self.rows))
        return _jsonable({"format": FORMAT, "datetime": self._datetime, "machine_info": {},
                          "benchmarks": self.rows, "sa_kernels": section})

    def write(self, complete=False):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump(self.data(complete), f, indent=1, allow_nan=False)
            f.write("\n")
        os.replace(tmp, self.path)


def _time(us):
    if us is None:
        return "-"
    if us < 1000:
        return f"{us:.1f} us" if us < 100 else f"{us:.0f} us"
    return f"{us / 1000:.2f} ms" if us < 100_000 else f"{us / 1000:.0f} ms"


def progress_line(index, total, elapsed_s, info):
    """One line per finished case: where the run is, what was measured, the two times."""
    head = f"[{index:>4}/{total:<4} {elapsed_s:6.0f} s]"
    what = " ".join(str(info.get(k)) for k in ("case", "dtype", "layout", "mode")
                    if info.get(k) is not None)
    if info.get("kind") == "model":
        what = " ".join(str(info.get(k)) for k in ("case", "layout", "precision"))
    parts = [f"{head} {what} | {info.get('provider')}",
             f"wall {_time(info.get('wall_us'))}", f"device {_time(info.get('device_us'))}"]
    if info.get("pct_copy_device") is not None:
        parts.append(f"{info['pct_copy_device']:.0f}% copy (device)")
    elif info.get("pct_copy_wall") is not None:
        parts.append(f"{info['pct_copy_wall']:.0f}% copy (wall)")
    if info.get("images_per_s") is not None:
        parts.append(f"{info['images_per_s']:.0f} images/s")
    if info.get("launches") is not None:
        parts.append(f"{info['launches']:g} launches")
    return " | ".join(parts)


def skip_line(index, total, elapsed_s, name, reason):
    return f"[{index:>4}/{total:<4} {elapsed_s:6.0f} s] {name}: skipped ({reason})"

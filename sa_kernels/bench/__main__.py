"""``python -m sa_kernels.bench``: run the benchmark suite, print the tables, write the plot.

    python -m sa_kernels.bench                        # run benchmarks/, report
    python -m sa_kernels.bench -- -k resnet50         # pass arguments on to pytest
    python -m sa_kernels.bench --json run.json        # report an existing run
    python -m sa_kernels.bench --json a.json --json b.json   # one report of two runs
    python -m sa_kernels.bench --out benchmarks/results

Files are named ``<device-slug>-<date>.{json,md,png}`` (``-t<threads>`` added on a CPU) and
go to ``--out`` (default ``.benchmarks/sa_kernels``, which git ignores). A suite run that
stops part-way is still reported: its JSON is written after every case.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from . import report

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the checkout holding sa_kernels/
DEFAULT_OUT = Path(".benchmarks") / "sa_kernels"


def find_benchmarks(explicit=None):
    candidates = [Path(explicit)] if explicit else [PACKAGE_ROOT / "benchmarks", Path("benchmarks")]
    for path in candidates:
        if (path / "conftest.py").is_file():
            return path
    raise SystemExit(
        "error: the benchmarks/ folder was not found (looked in "
        + ", ".join(str(p) for p in candidates)
        + "): run from a checkout of sa-kernels or pass --benchmarks DIR")


def run_suite(benchmarks, json_path, pytest_args):
    """pytest-benchmark on ``benchmarks``, its progress on this terminal; returns pytest's exit code."""
    env = dict(os.environ)
    env["SA_KERNELS_BENCH_WRAPPED"] = "1"  # benchmarks/conftest.py: the file is reported here
    env["PYTHONPATH"] = os.pathsep.join(
        [str(PACKAGE_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    command = [sys.executable, "-m", "pytest", str(benchmarks), "--benchmark-only",
               f"--sa-json={json_path}", *pytest_args]
    print("running:", " ".join(command), flush=True)
    return subprocess.call(command, env=env)


def sa_json_argument(pytest_args):
    """The path a ``--sa-json`` among the pytest arguments names (the last one wins, as in
    pytest), or None: the suite then writes there, and the report must read it from there."""
    path = None
    for i, arg in enumerate(pytest_args):
        if arg.startswith("--sa-json="):
            path = arg.split("=", 1)[1]
        elif arg == "--sa-json" and i + 1 < len(pytest_args):
            path = pytest_args[i + 1]
    return Path(path) if path else None


def unused_stem(out_dir, stem):
    """``stem``, or ``stem-2``, ``stem-3``...: never overwrite an earlier run's files."""
    candidate, n = stem, 1
    while any((out_dir / f"{candidate}{ext}").exists() for ext in (".json", ".md", ".png")):
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m sa_kernels.bench",
        description="Run the sa-kernels benchmarks (pytest-benchmark) and report them: a table "
                    "of medians, effective bandwidth and speedups, and a plot.",
        epilog="Arguments after -- go to pytest, e.g. -- -k resnet50 --sa-seconds 2")
    parser.add_argument("--json", metavar="FILE", action="append",
                        help="report this run's JSON (the suite's --sa-json or pytest-benchmark's) "
                             "instead of running the suite; repeat to merge several runs")
    parser.add_argument("--out", metavar="DIR", type=Path, default=None,
                        help=f"where the JSON, table (.md) and plot (.png) go (default {DEFAULT_OUT})")
    parser.add_argument("--no-plot", action="store_true", help="skip the plot (no matplotlib needed)")
    parser.add_argument("--benchmarks", metavar="DIR", help="the benchmarks folder to run")
    args, pytest_args = parser.parse_known_args(argv)
    if pytest_args and pytest_args[0] == "--":
        pytest_args = pytest_args[1:]
    if args.json and pytest_args:
        parser.error(f"pytest arguments {pytest_args} make no sense with --json")

    if not args.no_plot:
        try:  # before the suite runs, not after it
            report.require_matplotlib()
        except report.MissingDependencyError as e:
            raise SystemExit(f"error: {e}")

    benchmarks = None if args.json else find_benchmarks(args.benchmarks)
    out_dir = args.out or DEFAULT_OUT
    out_dir.mkdir(parents=True, exist_ok=True)
    exit_code, named = 0, None
    if args.json:
        sources = [Path(p) for p in args.json]
    else:
        # Renamed once the device and date are known, unless the caller named it.
        named = sa_json_argument(pytest_args)
        source = named or out_dir / f".run-{os.getpid()}.json"
        try:
            exit_code = run_suite(benchmarks, source, pytest_args)
        except KeyboardInterrupt:  # the suite's JSON holds every case it finished: report those
            exit_code = 130
        if not source.exists():
            raise SystemExit(f"error: pytest exited with code {exit_code} and wrote no results")
        sources = [source]

    try:
        data = report.merge([report.load(p) for p in sources])
    except (OSError, ValueError) as e:  # missing, unreadable or not JSON
        raise SystemExit(f"error: cannot read the run's JSON: {e}")
    rows = report.rows_from_json(data)
    info = report.run_info(data)
    stem = unused_stem(out_dir, report.output_stem(info))
    json_path, md_path, png_path = (out_dir / f"{stem}{ext}" for ext in (".json", ".md", ".png"))
    if (args.json and len(sources) == 1) or (not args.json and named):  # the caller's file stays
        shutil.copyfile(sources[0], json_path)
    elif args.json:
        json_path.write_text(json.dumps(data, indent=1) + "\n")
    else:
        sources[0].replace(json_path)
    text = report.format_report(data, rows)
    md_path.write_text(text)
    print()
    print(text)
    written = [json_path, md_path]
    if rows and not args.no_plot:
        env = info["environment"]
        report.write_plot(rows, png_path, f"Shuffle Attention: {env.get('device_name')}, "
                                          f"{env.get('date')}, torch {env.get('torch')}")
        written.append(png_path)
    print("wrote", ", ".join(str(p) for p in written))
    if not rows:
        return exit_code or 1
    return exit_code


if __name__ == "__main__":
    sys.exit(main())

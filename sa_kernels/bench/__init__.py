"""The benchmark suite's importable half: cases, byte counts, timing, environment and the report.

The pytest-benchmark files live in ``benchmarks/`` and stay thin; everything
that decides what is measured and how it is read back lives here, so the unit
tests in ``tests/test_bench_report.py`` cover it without a GPU. Run the suite
and print the report with ``python -m sa_kernels.bench``.

Nothing here imports matplotlib until a plot is asked for.
"""

"""The benchmark suite's importable half: cases, models, timing, the run log, the prewarm, the report.

The pytest-benchmark files live in ``benchmarks/`` and stay thin; everything
that decides what is measured and how it is read back lives here, so the unit
tests in ``tests/test_bench_report.py`` and ``tests/test_bench_suite.py`` cover
it without a GPU:

* ``cases``: kernel shapes, layouts, dtypes, modes and providers;
* ``models``: the SA-ResNet-50 end-to-end cases, providers and step builders;
* ``workload``: the modules and rotated inputs each kernel provider runs;
* ``timing``: wall time (CUDA events or perf_counter) and device time (torch.profiler);
* ``metrics``: bytes that must move, % of copy, speedups, memory, each row's fields;
* ``runlog``: the run's JSON, rewritten after every case, and the progress lines;
* ``prewarm``: torch.compile cases compiled in parallel processes before a run;
* ``report``: the tables, issue 10's targets and the plot (``python -m sa_kernels.bench``).

Nothing here imports matplotlib until a plot is asked for.
"""

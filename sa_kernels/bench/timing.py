"""Timing for the benchmarks: the two times of a call, input rotation past the cache, round
planning, and the device's copy bandwidth.

Each call gets two times:

* **wall time** (``wall_us``): pytest-benchmark's rounds. On a GPU they are timed with CUDA
  events recorded on the current stream around the round (``CudaEventClock``); a round runs
  ``iterations`` calls back to back, so the host launches ahead of the device as in a training
  loop, and the time per call is the larger of the host's and the device's cost. On a CPU,
  pytest-benchmark's own ``time.perf_counter`` is exact: the work is synchronous.
* **device time** (``device_us``, GPU only): the sum of the durations of the kernels, memsets
  and copies a call ran, read with ``torch.profiler`` (CUDA activity) over a few calls. It
  leaves out launch gaps and host work: it is what the kernels cost. ``launches`` is the
  number of those device activities per call. On a CPU the host is the device: there is no
  separate device time (``None``), and ``launches`` counts the operator calls (the profiler's
  ``cpu_op`` events, nested ones included) per call, a measure of dispatch overhead.

Warm-up (compilation, module loading, autotuning) runs before either measurement.
"""
import glob
import math
import os
import statistics
import time

import torch

MiB = 1 << 20
GiB = 1 << 30

# Per-case measured time, in seconds, when the caller does not choose one.
DEFAULT_BUDGET_S = {"cuda": 0.2, "cpu": 0.5}
# Calls under the profiler for the device time: the device time of a call barely varies, so a
# few calls give it; the profiler's start and parse cost more than the calls themselves.
PROFILED_CALLS = 5
# The profiler's activity types that are work on a GPU (kineto's names). Everything else it
# records on the device timeline (gpu_user_annotation ranges, which span kernels already
# counted) or on the host (cuda_runtime, overhead, cpu_op) is left out.
DEVICE_WORK = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})


class _EventStamp:
    """One reading of ``CudaEventClock``: an event recorded on the device's current stream."""

    __slots__ = ("event",)

    def __init__(self, event):
        self.event = event

    def __sub__(self, earlier):
        # pytest-benchmark computes ``end - start`` right after the round: wait for the device
        # to reach the end event, then read the interval between the two events (ms -> s).
        self.event.synchronize()
        return earlier.event.elapsed_time(self.event) / 1e3


class CudaEventClock:
    """A pytest-benchmark timer whose readings are CUDA events, so rounds measure device time."""

    __name__ = "cuda_event_clock"  # what pytest-benchmark writes as the timer's name in its JSON

    def __init__(self, new_event=None):
        self._new_event = new_event or (lambda: torch.cuda.Event(enable_timing=True))

    def __call__(self):
        event = self._new_event()
        event.record()
        return _EventStamp(event)


def use_device_clock(benchmark, device, clock=None):
    """Make ``benchmark`` time its rounds on ``device``; returns the timer's description."""
    if torch.device(device).type != "cuda":
        return "perf_counter"
    # pytest-benchmark has no public per-test timer; ``_timer`` is read when each round's
    # runner is made (pytest-benchmark 3.x to 5.x). Fail loudly rather than time host launches.
    if not hasattr(benchmark, "_timer"):
        raise RuntimeError("this pytest-benchmark has no per-fixture timer (_timer); "
                           "CUDA-event timing cannot be installed")
    benchmark._timer = clock or CudaEventClock()
    return "cuda events"


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def cache_bytes(device):
    """The cache that repeated runs must not be served from: the GPU's L2, or the CPU's last level."""
    device = torch.device(device)
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        return size or 64 * MiB  # torch builds without the property: larger than any current L2
    size = _cpu_last_level_cache_bytes()
    if size:
        return size
    return 32 * MiB


def _cpu_last_level_cache_bytes(root="/sys/devices/system/cpu/cpu0/cache"):
    """The largest cache Linux reports for CPU 0 (sizes such as ``266240K``); 0 if unknown."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    best = 0
    for index in glob.glob(os.path.join(root, "index*")):
        try:
            with open(os.path.join(index, "size")) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text[-1:].upper() in units and text[:-1].isdigit():
            best = max(best, int(text[:-1]) * units[text[-1].upper()])
        elif text.isdigit():
            best = max(best, int(text))
    return best


def rotation_count(set_bytes, cache, min_count=2, max_count=256):
    """Input sets to rotate among so that together they are twice the cache (at least two)."""
    if set_bytes <= 0:
        raise ValueError(f"set_bytes must be positive, got {set_bytes}")
    return max(min_count, min(max_count, math.ceil(2 * cache / set_bytes)))


def plan_rounds(estimate_s, budget_s, min_round_s=0.0, min_rounds=5, max_rounds=1000,
                max_iterations=100):
    """(rounds, iterations per round) for a step of about ``estimate_s`` in ``budget_s`` seconds.

    Short steps run several iterations per round so that a round lasts ``min_round_s``
    (the round's fixed cost, the first launch and the event pair, is then spread thin).
    """
    estimate_s = max(estimate_s, 1e-9)
    iterations = max(1, min(max_iterations, math.ceil(min_round_s / estimate_s)))
    rounds = int(budget_s / (estimate_s * iterations))
    return max(min_rounds, min(max_rounds, rounds)), iterations


def time_calls(step, device, calls):
    """Seconds per call of ``calls`` back-to-back calls (device time on a GPU)."""
    device = torch.device(device)
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    start = time.perf_counter()
    for _ in range(calls):
        step()
    return (time.perf_counter() - start) / calls


def run_benchmark(benchmark, step, device, budget_s=None, warmup_calls=None, min_round_s=None,
                  min_rounds=None, estimate_calls=None):
    """Warm ``step`` up, then time it with ``benchmark.pedantic``: the wall time per call (median, s).

    On a GPU a round runs enough calls back to back to last ``min_round_s`` (default 1 ms), at
    least ``min_rounds`` rounds (default 10 on a GPU, 5 on a CPU); ``estimate_calls`` calls
    (default 5 on a GPU, 1 on a CPU) size the rounds.

    With ``--benchmark-disable`` the step runs once (a smoke test) and ``None`` comes back.
    """
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    if benchmark.disabled:
        benchmark.pedantic(step)  # pytest-benchmark runs it once
        synchronize(device)
        return None
    if budget_s is None:
        budget_s = DEFAULT_BUDGET_S["cuda" if on_gpu else "cpu"]
    # The first calls compile, load modules and autotune; the estimate's calls come after them.
    start = time.perf_counter()
    for _ in range(warmup_calls if warmup_calls is not None else (3 if on_gpu else 1)):
        step()
    synchronize(device)
    benchmark.extra_info["warmup_s"] = time.perf_counter() - start
    estimate = time_calls(step, device, estimate_calls or (5 if on_gpu else 1))
    if on_gpu:
        rounds, iterations = plan_rounds(estimate, budget_s, min_round_s=min_round_s or 1e-3,
                                         min_rounds=min_rounds or 10)
    else:
        rounds, iterations = plan_rounds(estimate, budget_s, min_round_s=min_round_s or 0.0,
                                         min_rounds=min_rounds or 5)
    timer = use_device_clock(benchmark, device)
    benchmark.extra_info.update(timer=timer, rounds_planned=rounds, iterations=iterations)
    benchmark.pedantic(step, rounds=rounds, iterations=iterations, warmup_rounds=1)
    return benchmark.stats.stats.median


def measure_copy_bandwidth(device, nbytes=None, repeats=None):
    """The device's copy bandwidth: a large ``copy_`` counted as bytes read plus bytes written.

    The tensor is four times a GPU's L2 or twice a CPU's last-level cache (256 MiB to
    1 GiB), filled with a tiled random block (random bytes at a fraction of the RNG's cost).
    """
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    if nbytes is None:
        nbytes = min(GiB, max(256 * MiB, (4 if on_gpu else 2) * cache_bytes(device)))
    repeats = repeats or (50 if on_gpu else 5)
    block = torch.empty(MiB // 4, device=device, dtype=torch.float32).uniform_(-1, 1)
    src = block.repeat(max(1, nbytes // MiB))
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch and warm-up
    if on_gpu:
        # Queued back to back and read after one synchronisation: the device never waits
        # for the host between copies, so the events bracket the copies alone.
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for start, end in events:
            start.record()
            dst.copy_(src)
            end.record()
        torch.cuda.synchronize(device)
        seconds = [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        seconds = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            dst.copy_(src)
            seconds.append(time.perf_counter() - t0)
    median = statistics.median(seconds)
    moved = 2 * src.numel() * src.element_size()
    return {
        "gbps": moved / median / 1e9,
        "bytes_copied": src.numel() * src.element_size(),
        "median_s": median,
        "repeats": repeats,
        "method": f"median of {repeats} copy_ of {moved // 2 // MiB} MiB, read + write bytes, "
                  + ("CUDA events" if on_gpu else "perf_counter"),
    }


def _activity_type(event):
    """kineto's activity type of a profiler event (``None`` on torch versions that lack it)."""
    kind = getattr(event, "activity_type", None)
    return None if kind is None else str(kind)


def device_activities(events, device_type="cuda"):
    """The profiler events that are work on ``device_type``.

    CUDA: kernels, memcpys and memsets. Read by kineto's activity type where the event has
    one; otherwise (older torch) every event on the CUDA device that is not a user annotation
    (``record_function`` ranges, which kineto mirrors on the GPU timeline over kernels that
    are already counted). CPU: the operator calls (``cpu_op``; every CPU event but user
    annotations and Python frames where the type is unknown).
    """
    want = torch.device(device_type).type
    typed, untyped = [], []
    for event in events:
        kind = _activity_type(event)
        on_device = str(getattr(event, "device_type", "")).split(".")[-1].lower() == want
        if on_device and not getattr(event, "is_user_annotation", False) \
                and not getattr(event, "is_python_function", False):
            untyped.append(event)
        if kind in (DEVICE_WORK if want == "cuda" else ("cpu_op",)):
            typed.append(event)
    # Activity types where this torch has them; were none recognised (types this reader does
    # not know), the device's events are the better answer than none.
    return typed or untyped


def summarize_activities(events, device_type, calls):
    """``{"device_us", "launches"}`` per call from a profile of ``calls`` calls.

    ``device_us`` is the summed duration of the device work (``None`` on a CPU, where the
    host is the device and the wall time is the only time); ``launches`` the number of device
    activities (GPU) or operator calls (CPU) per call.
    """
    if calls <= 0:
        raise ValueError(f"calls must be positive, got {calls}")
    work = device_activities(events, device_type)
    device_us = None
    if torch.device(device_type).type == "cuda":
        device_us = sum(e.time_range.elapsed_us() for e in work) / calls
    return {"device_us": device_us, "launches": len(work) / calls}


def profile_calls(step, device, calls=PROFILED_CALLS):
    """Run ``step`` ``calls`` times under ``torch.profiler``; returns its events.

    CPU activity always, CUDA activity on a GPU. The device is synchronised before (so no
    earlier work is caught) and inside the profile after the calls (so all of theirs is).
    """
    device = torch.device(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    synchronize(device)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            step()
        synchronize(device)
    return prof.events()


def measure_device_time(step, device, calls=PROFILED_CALLS):
    """``{"device_us", "launches", "profiled_calls", "profile_s"}`` for ``step`` (see the module doc).

    A profiler that cannot run here gives ``device_us = launches = None`` and the error, so a
    case still keeps its wall time.
    """
    start = time.perf_counter()
    try:
        events = profile_calls(step, device, calls)
        result = summarize_activities(events, torch.device(device).type, calls)
    except RuntimeError as e:
        result = {"device_us": None, "launches": None, "profile_error": str(e).splitlines()[0]}
    result.update(profiled_calls=calls, profile_s=time.perf_counter() - start)
    return result


def launch_cost_us(device, calls=200):
    """Wall time per call of a tiny op issued back to back: the host's cost of one launch.

    Measured at the start and the end of a run: if it grows (a profiler left attached, say),
    the wall times of the run's host-bound cases grew with it.
    """
    device = torch.device(device)
    x = torch.zeros(16, device=device)
    for _ in range(10):
        x.add_(1)
    return time_calls(lambda: x.add_(1), device, calls) * 1e6

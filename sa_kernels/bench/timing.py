"""Timing for the benchmarks: a CUDA-event clock for pytest-benchmark, input rotation past the
cache, round planning, and the device's copy bandwidth that effective bandwidths are read against.

On a GPU, pytest-benchmark's rounds are timed with CUDA events recorded on the current stream
around the round (``CudaEventClock``); a round runs ``iterations`` steps back to back, so
the host launches ahead of the device as in a training loop, and pytest-benchmark divides by
``iterations``. Warm-up (compilation, module loading, autotuning) runs before any round.
On a CPU, pytest-benchmark's own ``time.perf_counter`` timer is exact: the work is synchronous.
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
DEFAULT_BUDGET_S = {"cuda": 1.0, "cpu": 0.5}


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


def run_benchmark(benchmark, step, device, budget_s=None, warmup_calls=None):
    """Warm ``step`` up, then time it with ``benchmark.pedantic``. Returns the median in seconds.

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
    for _ in range(warmup_calls if warmup_calls is not None else (3 if on_gpu else 1)):
        step()
    estimate = time_calls(step, device, 5 if on_gpu else 1)
    if on_gpu:
        rounds, iterations = plan_rounds(estimate, budget_s, min_round_s=1e-3, min_rounds=10)
    else:
        rounds, iterations = plan_rounds(estimate, budget_s, min_rounds=5)
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

"""What a measured time means: bytes that must move, effective bandwidth, speedups, memory.

Bytes that must move (the issue's count, the floor any implementation pays):

* forward: 2x the input's bytes (read x, write out);
* forward+backward: 5x (forward's 2x, then read x and dy and write dx).

Per-plane statistics and parameters are O(B*C) and not counted.
"""
import torch

BYTES_PER_INPUT_BYTE = {"forward": 2, "forward+backward": 5}


def bytes_moved(input_bytes, mode):
    try:
        return BYTES_PER_INPUT_BYTE[mode] * input_bytes
    except KeyError:
        raise ValueError(f"mode must be one of {tuple(BYTES_PER_INPUT_BYTE)}, got {mode!r}") from None


def effective_gbps(nbytes, seconds):
    """Bytes over time in GB/s (1e9 bytes per second); ``None`` when either is missing."""
    if nbytes is None or not seconds:
        return None
    return nbytes / seconds / 1e9


def percent_of(value, reference):
    if value is None or not reference:
        return None
    return 100.0 * value / reference


def speedup(baseline_seconds, seconds):
    """How many times faster than the baseline (baseline time over this time); ``None`` if unknown."""
    if baseline_seconds is None or not seconds:
        return None
    return baseline_seconds / seconds


def saved_tensor_bytes(fn):
    """Run ``fn`` and count the bytes autograd saves for backward: ``(bytes, fn's result)``.

    Counts unique storages, once each and whole (a saved view keeps its base's storage
    alive), through ``torch.autograd.graph.saved_tensors_hooks``. Keep the result alive
    until the count is read if it matters that the graph exists; the count itself is
    taken while the graph is built.
    """
    storages = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            storages[(storage.device, storage.data_ptr())] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage
            storages[("tensor", id(t))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return sum(storages.values()), result


def peak_memory_delta(fn, device):
    """Peak device memory ``fn`` allocates above what was allocated before it: ``(bytes, result)``.

    CUDA only (``None`` elsewhere): ``reset_peak_memory_stats`` then ``max_memory_allocated``
    minus the allocation before the call.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None, fn()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - baseline, result


def case_record(case, provider, median_s, copy_gbps, baseline_medians, peak_memory_bytes=None,
                saved_bytes=None):
    """A case's ``extra_info`` for pytest-benchmark: what it is and what its median means.

    ``baseline_medians`` maps ``eager``/``compile`` to their medians measured earlier in the
    same session (missing when they were skipped or filtered out). The report recomputes
    speedups from the JSON; these are here so the raw JSON reads on its own.
    """
    moved = bytes_moved(case.input_bytes, case.mode)
    gbps = effective_gbps(moved, median_s)
    return {
        "case": case.shape.label,
        "shape": list(case.shape.dims),
        "groups": case.shape.groups,
        "dtype": str(case.dtype).replace("torch.", ""),
        "mode": case.mode,
        "provider": provider,
        "median_s": median_s,
        "input_bytes": case.input_bytes,
        "bytes_moved": moved,
        "gbps": gbps,
        "copy_gbps": copy_gbps,
        "pct_of_copy": percent_of(gbps, copy_gbps),
        "speedup_vs_eager": speedup(baseline_medians.get("eager"), median_s),
        "speedup_vs_compile": speedup(baseline_medians.get("compile"), median_s),
        "peak_memory_bytes": peak_memory_bytes,
        "saved_bytes": saved_bytes,
    }

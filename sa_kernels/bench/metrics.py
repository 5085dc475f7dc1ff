"""What a measured time means: bytes that must move, effective bandwidth, speedups, memory.

Bytes that must move (the issue's count, the floor any implementation pays):

* forward: 2x the input's bytes (read x, write out);
* forward+backward: 5x (forward's 2x, then read x and dy and write dx).

Per-plane statistics and parameters are O(B*C) and not counted.
"""
import torch

BYTES_PER_INPUT_BYTE = {"forward": 2, "forward+backward": 5}

# Fields every row's ``extra_info`` holds (``None`` where a figure does not apply: device time
# on a CPU, % of copy for a whole model). Tools outside the suite read these names: keep them.
ROW_FIELDS = ("provider", "mode", "shape", "dtype", "layout", "input_bytes", "wall_us",
              "device_us", "pct_copy_wall", "pct_copy_device", "launches", "peak_bytes",
              "saved_bytes", "device_name", "torch", "triton")


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


def ratio(value, reference):
    """``value / reference`` (how many times the reference's time this time is); ``None`` if unknown."""
    if value is None or not reference:
        return None
    return value / reference


# The comparisons every kernel row carries, on wall and on device time: against the reference
# (speedups: the baseline's time over this one, higher is faster) and against the yardsticks
# (multiples: this time over the yardstick's, lower is faster; issue 10's targets read
# "fused <= 2x copy", "fused <= 1.5x nn.GroupNorm").
SPEEDUPS = ("eager", "compile")
MULTIPLES = ("copy", "groupnorm")
CLOCKS = ("wall", "device")


def comparisons(wall_s, device_s, moved, input_bytes, refs, fallback_copy_gbps=None):
    """Every derived figure of one kernel row: % of copy, speedups and multiples, wall and device.

    ``refs`` maps ``eager``, ``compile``, ``groupnorm`` (the same case) and ``copy`` (the same
    shape, dtype and layout; a copy of x moves 2x its bytes) to ``(wall_s, device_s)`` pairs
    measured in the same run; a missing one leaves its figures ``None``. % of copy is the
    row's effective bandwidth (bytes that must move over its time) against the copy's; when
    the case's copy was not measured, against ``fallback_copy_gbps`` (the run's large copy).
    """
    times = {"wall": wall_s, "device": device_s}
    out = {}
    copy = refs.get("copy")
    for clock, index in (("wall", 0), ("device", 1)):
        t = times[clock]
        copy_gbps = fallback_copy_gbps
        if copy is not None and copy[index]:
            copy_gbps = effective_gbps(2 * input_bytes, copy[index])
        out[f"pct_copy_{clock}"] = percent_of(effective_gbps(moved, t), copy_gbps)
        for name in SPEEDUPS:
            ref = refs.get(name)
            out[f"speedup_vs_{name}_{clock}"] = speedup(None if ref is None else ref[index], t)
        for name in MULTIPLES:
            ref = refs.get(name)
            out[f"x_{name}_{clock}"] = ratio(t, None if ref is None else ref[index])
    out["copy_reference"] = ("copy" if copy is not None else
                             "large copy_" if fallback_copy_gbps else None)
    return out


def _us(seconds):
    return None if seconds is None else seconds * 1e6


def case_record(case, provider, wall_s, device, refs, fallback_copy_gbps=None, peak_bytes=None,
                saved_bytes=None):
    """A kernel case's ``extra_info``: what it is, its two times and what they mean.

    ``device`` is ``timing.measure_device_time``'s result; ``refs`` as in ``comparisons``.
    The report recomputes the comparisons from the run's rows (so a run filtered with ``-k``
    still reads right); they are here too so that the JSON reads on its own.
    """
    moved = bytes_moved(case.input_bytes, case.mode)
    device_us = device.get("device_us")
    device_s = None if device_us is None else device_us * 1e-6
    record = {
        "kind": "kernel",
        "case": case.shape.label,
        "shape": list(case.shape.dims),
        "groups": case.shape.groups,
        "dtype": str(case.dtype).replace("torch.", ""),
        "layout": case.layout,
        "mode": case.mode,
        "provider": provider,
        "input_bytes": case.input_bytes,
        "bytes_moved": moved,
        "wall_us": _us(wall_s),
        "device_us": device_us,
        "launches": device.get("launches"),
        "gbps_wall": effective_gbps(moved, wall_s),
        "gbps_device": effective_gbps(moved, device_s),
        "peak_bytes": peak_bytes,
        "saved_bytes": saved_bytes,
    }
    record.update(comparisons(wall_s, device_s, moved, case.input_bytes, refs, fallback_copy_gbps))
    record.update({k: v for k, v in device.items() if k not in record})
    return record


class References:
    """Times measured earlier in a run, which later rows are compared with.

    Kept per case and provider; a ``copy`` is also kept under the case's family (shape,
    dtype, layout), since one copy of x serves both modes.
    """

    def __init__(self):
        self._times = {}

    def record(self, case, provider, wall_s, device_s):
        self._times[(case.id, provider)] = (wall_s, device_s)
        if provider == "copy" and hasattr(case, "family"):
            self._times[(case.family, "copy")] = (wall_s, device_s)

    def for_case(self, case, providers):
        """``{provider: (wall_s, device_s)}`` of ``providers`` measured for ``case`` so far."""
        out = {}
        for provider in providers:
            key = case.family if provider == "copy" and hasattr(case, "family") else case.id
            if (key, provider) in self._times:
                out[provider] = self._times[(key, provider)]
        return out

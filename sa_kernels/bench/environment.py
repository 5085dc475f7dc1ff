"""Where a benchmark ran: device, library versions, date; and the file-name slug made from them."""
import datetime
import importlib.metadata
import os
import platform
import re

import torch


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"CPU {cpu_model()}"
    return str(device)


def package_version(name):
    """The installed distribution's version (read from its metadata: nothing is imported)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def slug(text):
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``; trademarks and punctuation dropped."""
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown"


def environment_info(device):
    device = torch.device(device)
    info = {
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_cores": os.cpu_count(),
        # The ISA that torch's (and the cpu backend's) vector kernels were picked for.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            compute_capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            memory_bytes=props.total_memory,
            l2_cache_bytes=getattr(props, "L2_cache_size", None),
        )
    return info

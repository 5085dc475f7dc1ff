"""One SA-ResNet-50 training step (forward, backward, SGD step) with the fused vs the reference SA, on a GPU.

    pytest benchmarks/test_bench_sa_resnet.py --benchmark-only

Reports the step time (device-timed rounds, median) and the step's peak CUDA memory
above what was allocated before it. Skipped without CUDA: a full ResNet-50 step at
224x224 is not a CPU benchmark.
"""
import pytest
import torch

from sa_kernels.bench import metrics, workload

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BATCH = 32
IMAGE = 224
PRECISIONS = {"float32": None, "bf16-autocast": torch.bfloat16}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_sa_resnet50_training_step(benchmark, measure, bench_device, environment, fused, precision):
    step = workload.sa_resnet50_training_step(fused, bench_device, BATCH, IMAGE, PRECISIONS[precision])
    benchmark.group = f"sa_resnet50 train step, batch {BATCH}, {IMAGE}x{IMAGE}, {precision}"
    median = measure(step)
    if median is None:  # --benchmark-disable: one smoke step
        return
    peak, _ = metrics.peak_memory_delta(step, bench_device)
    benchmark.extra_info.update(model="sa_resnet50", fused=fused, precision=precision, batch=BATCH,
                                step_ms=median * 1e3, images_per_s=BATCH / median,
                                peak_memory_mib=peak / 2**20, **environment)

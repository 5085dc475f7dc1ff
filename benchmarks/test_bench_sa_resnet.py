"""One SA-ResNet-50 training step (forward, backward, SGD step) with the fused vs the reference SA, on a GPU.

    pytest benchmarks/test_bench_sa_resnet.py --benchmark-only

Reports the step time (device-timed rounds, median) and the step's peak CUDA memory
above what was allocated before it. Skipped without CUDA: a full ResNet-50 step at
224x224 is not a CPU benchmark.
"""
import pytest
import torch
import torch.nn.functional as F

from sa_kernels.bench import metrics
from sa_kernels.models import sa_resnet50

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BATCH = 32
IMAGE = 224
PRECISIONS = {"float32": None, "bf16-autocast": torch.bfloat16}


def make_training_step(fused, autocast_dtype):
    torch.manual_seed(0)
    model = sa_resnet50(fused=fused).cuda().to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(BATCH, 3, IMAGE, IMAGE, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (BATCH,), device="cuda")

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    return step


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_sa_resnet50_training_step(benchmark, measure, bench_device, environment, fused, precision):
    step = make_training_step(fused, PRECISIONS[precision])
    benchmark.group = f"sa_resnet50 train step, batch {BATCH}, {IMAGE}x{IMAGE}, {precision}"
    median = measure(step)
    if median is None:  # --benchmark-disable: one smoke step
        return
    peak, _ = metrics.peak_memory_delta(step, bench_device)
    benchmark.extra_info.update(model="sa_resnet50", fused=fused, precision=precision, batch=BATCH,
                                step_ms=median * 1e3, images_per_s=BATCH / median,
                                peak_memory_mib=peak / 2**20, **environment)

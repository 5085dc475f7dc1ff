"""One SA-ResNet-50 training step (forward, backward, SGD step) with the fused vs the reference SA, on a GPU.

    PYTHONPATH=. python -m pytest benchmarks/test_bench_sa_resnet.py --benchmark-columns=min,median,max

Reports step time (pytest-benchmark) and the step's peak CUDA memory
(``extra_info["peak_memory_mib"]``). Skipped without CUDA.
"""
import pytest
import torch
import torch.nn.functional as F

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
        torch.cuda.synchronize()  # the benchmark times the host; wait for the GPU

    return step


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_sa_resnet50_training_step(benchmark, fused, precision):
    step = make_training_step(fused, PRECISIONS[precision])
    step()  # first step: allocator warm-up, kernel selection, any backend build
    torch.cuda.reset_peak_memory_stats()
    benchmark.group = f"sa_resnet50 train step, batch {BATCH}, {IMAGE}x{IMAGE}, {precision}"
    benchmark.pedantic(step, rounds=20, warmup_rounds=3)
    benchmark.extra_info["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    benchmark.extra_info["images_per_s"] = BATCH / benchmark.stats.stats.median

"""benchmarks/cuda_variants.py without a GPU: its plan, the split of a profiler session by
marker kernels, and the parsers of ptxas and cuobjdump output (on a real compile where nvcc
is present: tests/test_cuda_compile.py)."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("cuda_variants", ROOT / "benchmarks" / "cuda_variants.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cv = _load()


def test_plan_has_every_case_dtype_and_mode():
    plan = cv.build_plan()
    assert len(plan) == len(cv.CASES) * len(cv.DTYPES) * len(cv.MODES)
    for item in plan:
        case, names = item["case"], [n for n, _ in item["variants"]]
        assert names[0] == "auto" and item["variants"][0][1] == 0
        assert len(set(names)) == len(names)
        n = case.elements * cv.ELEMENT_BYTES[item["dtype"]]
        assert item["input_bytes"] == n
        assert item["moved_bytes"] == (2 * n if item["mode"] == "forward" else 5 * n)
        assert ("reduce_warp" in names) == (item["mode"] == "step")
        assert any(n.startswith("cluster") for n in names) == (case.layout == "nhwc")
        small = case.layout == "nchw" and case.height * case.width <= cv.STAGED_MAX_PLANE
        assert ("staged" in names) == small
        assert ("plane_cluster16" in names) == (case.name == "large")  # planes past a block's hold


def test_variant_values_decode_to_their_fields():
    """The integers the script sends are the fields Variant::decode reads (csrc/shuffle_attention.h)."""
    assert cv.decode(cv.PLANES_STAGED) == {"planes": 2, "reduce": 0, "cluster": 0}
    assert cv.decode(cv.REDUCE_BLOCK) == {"planes": 0, "reduce": 2, "cluster": 0}
    assert cv.decode(cv.cluster(16) | cv.REDUCE_WARP) == {"planes": 0, "reduce": 1, "cluster": 16}
    header = (ROOT / "csrc" / "shuffle_attention.h").read_text()
    assert "int(v & 0xf), int((v >> 4) & 0xf), int((v >> 8) & 0xff)" in header


def test_plan_selects_cases():
    plan = cv.build_plan(["s4", "b1-nhwc"], ("bfloat16",), ("step",))
    assert [(i["case"].name, i["dtype"], i["mode"]) for i in plan] == [
        ("s4", "bfloat16", "step"), ("b1-nhwc", "bfloat16", "step")]


def test_dry_run(capsys):
    assert cv.main(["--dry-run", "--cases", "seed"]) == 0
    out = capsys.readouterr().out
    assert "seed" in out and "staged=2" in out and "4 case-modes" in out


def test_split_by_markers():
    m = "void at::cuda::(anonymous namespace)::spin_kernel(long)"
    events = [  # unordered, as a profiler may list them
        ("copy_kernel", 11.0, 3.0), (m, 0.0, 1.0), ("fwd", 21.0, 5.0), (m, 10.0, 1.0),
        ("fwd", 27.0, 5.0), (m, 20.0, 1.0), (m, 40.0, 1.0), ("bwd", 33.0, 2.0)]
    segments = cv.split_by_markers(events, ["copy", "auto", "staged"])
    assert segments == {"copy": [], "auto": [("copy_kernel", 3.0)],
                        "staged": [("fwd", 5.0), ("fwd", 5.0), ("bwd", 2.0)]}
    with pytest.raises(ValueError):
        cv.split_by_markers(events, ["copy", "auto"])
    with pytest.raises(ValueError):
        cv.split_by_markers([("fwd", 0.0, 1.0)] + events, ["copy", "auto", "staged"])


def test_short_kernel_name():
    name = "void sa_kernels::detail::forward_held_kernel<float, 4, 8, 64>(sa_kernels::ForwardParams<float>)"
    assert cv.short_kernel_name(name) == "forward_held_kernel<float, 4, 8, 64>"


PTXAS = """\
ptxas info    : Compiling entry function '_Z1fv' for 'sm_80'
ptxas info    : Function properties for _Z1fv
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 8 bytes cumulative stack size
ptxas info    : Compiling entry function '_Z1fv' for 'sm_90'
ptxas info    : Function properties for _Z1fv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 19456 bytes smem, 400 bytes cmem[0]
"""

SASS = """\
\tcode for sm_90
\t\tFunction : _Z1fv
\t.headerflags\t@"EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/              @!P0 LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   LDG.E R8, desc[UR4][R2.64] ;
        /*0030*/                   STS.128 [R0], R4 ;
        /*0038*/                   LDGSTS.E.BYPASS.128 [R0+0x10], desc[UR4][R2.64] ;
        /*0040*/                   STG.E.128 desc[UR4][R6.64], R4 ;
        /*0050*/                   STL [R1], R9 ;
"""


def test_parse_ptxas_keeps_the_asked_architecture():
    assert cv.parse_ptxas(PTXAS, "sm_90") == {"_Z1fv": {"registers": 64, "stack": 0, "spill_stores": 0,
                                                        "spill_loads": 0, "smem": 19456}}
    assert cv.parse_ptxas(PTXAS, "sm_80")["_Z1fv"]["spill_stores"] == 4


def test_parse_sass_counts_vector_and_local_accesses():
    counts = cv.parse_sass(SASS.replace("code for sm_90", "arch = sm_90"), "sm_90")["_Z1fv"]
    assert counts == {"ldg128": 1, "stg128": 1, "ldg": 2, "stg": 1, "ldgsts128": 1, "lds128": 0,
                      "sts128": 1, "ldl": 0, "stl": 1}

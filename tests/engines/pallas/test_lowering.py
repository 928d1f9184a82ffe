"""Every Pallas kernel lowers to Triton IR for CUDA, and (with the triton package) compiles for Hopper, on a machine
without a GPU: catches an operation the Pallas Triton lowering lacks, or a kernel over the shared-memory limit,
before a GPU is involved. See triton_ir.py.
"""
import pytest

from tests.helpers import BACKEND

if BACKEND != "jax":
    pytest.skip(f"the Pallas engine runs under the jax backend (KERAS_BACKEND={BACKEND})", allow_module_level=True)
pytest.importorskip("jax.experimental.pallas.triton", reason="this jax has no Pallas Triton backend")

from tests.engines.pallas import triton_ir  # noqa: E402

KERNELS = {"wkv6_state_terms", "wkv6_scan", "wkv6_forward", "wkv6_backward", "wkv6_recurrent"}
# the two ways of the state scan (scan.launch_scan): state terms then the plain scan, or one fused kernel
STATE_SCANS = {"terms+scan": ({"state_scan_min_programs": 1 << 30}, {"wkv6_state_terms", "wkv6_scan"}),
               "fused": ({"state_scan_min_programs": 0}, {"wkv6_state_scan"})}
HOPPER_SMEM = 227 * 1024


@pytest.mark.parametrize("state_scan", sorted(STATE_SCANS))
@pytest.mark.parametrize("N, dtype, chunk, low_precision", [
    (16, "bfloat16", 32, "tf32"), (32, "float16", 32, "f16"), (64, "bfloat16", 32, "bf16"),
    (64, "float32", 32, "tf32"), (64, "bfloat16", 64, "tf32"), (128, "bfloat16", 32, "tf32"),
    (256, "float32", 16, "tf32"),
])
def test_every_kernel_lowers_to_triton(N, dtype, chunk, low_precision, state_scan):
    settings, scans = STATE_SCANS[state_scan]
    modules = triton_ir.capture(N, dtype, chunk, low_precision, T=2 * chunk + 3, **settings)
    assert set(modules) == KERNELS - STATE_SCANS["terms+scan"][1] | scans
    for name, ir in modules.items():
        assert f"tt.func public @{name}" in ir
    if dtype == "float32":
        assert "tf32x3" in modules["wkv6_forward"], "float32 inputs must use float32-accurate products"


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_kernels_compile_for_hopper(dtype):
    import importlib.util

    import jax

    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is here: the kernels are compiled by XLA's own Triton in test_gpu.py")
    if importlib.util.find_spec("triton") is None:
        pytest.skip("the triton package compiles the IR; it is not installed")
    reports = triton_ir.compile_reports(triton_ir.capture(64, dtype, 32), N=64, dtype=dtype)
    assert {r["kernel"] for r in reports} == KERNELS
    for report in reports:
        assert 0 <= report["smem"] <= HOPPER_SMEM, report
        if "registers" in report:
            assert report["registers"] <= 255, report
        if report["kernel"] in ("wkv6_state_terms", "wkv6_forward", "wkv6_backward"):
            assert report.get("mma", 1) > 0, f"no tensor-core instructions: {report}"

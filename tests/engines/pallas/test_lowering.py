"""Every Pallas kernel lowers to Triton IR for CUDA, with the product precisions and the exp the GPU runs, and (with
the triton package) compiles for Hopper, on a machine without a GPU: catches an operation the Pallas Triton lowering
lacks, a precision mode lost on the way, or a kernel over the shared-memory limit, before a GPU is involved. See
benchmarks/pallas_compile_report.py.
"""
import importlib.util
import re

import pytest

from tests.helpers import load_script

pytestmark = pytest.mark.requires("pallas")

report = load_script("benchmarks/pallas_compile_report.py")
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
    modules = report.capture(N, dtype, chunk, low_precision, T=2 * chunk + 3, **settings)
    assert set(modules) == KERNELS - STATE_SCANS["terms+scan"][1] | scans
    for name, ir in modules.items():
        assert f"tt.func public @{name}" in ir
    if dtype == "float32":
        assert "tf32x3" in modules["wkv6_forward"], "float32 inputs must use float32-accurate products"


def arguments(ir, name):
    """The number of arguments of kernel `name` in its Triton IR."""
    header = re.search(rf"tt\.func public @{name}\(([^)]*)\)", ir).group(1)
    return len(re.findall(r"%arg\d+", header))


def products(ir):
    """How the tile products of a kernel multiply: "bf16"/"f16" for 16-bit operands, else the float32 operands'
    input precision ("tf32x3", "tf32", "ieee")."""
    found = set()
    for precision, a, b in re.findall(r"tt\.dot [^\n]*inputPrecision = (\w+) : tensor<[^>]*x(\w+)> \* "
                                      r"tensor<[^>]*x(\w+)>", ir):
        found.add({"bf16": "bf16", "f16": "f16"}.get(a, precision) if a == b else f"{a}*{b}")
    return found


# (dtype, low_precision): (the float32 or 16-bit products of the inputs' tiles, the products with a state), besides
# the masked sums' exact bfloat16 ones
PRODUCTS = {("float32", "tf32"): ({"tf32x3"}, {"tf32x3"}),   # float32 inputs: float32-accurate, whatever the mode
            ("bfloat16", "bf16"): (set(), set()),           # every operand rounded to bfloat16, the state's too
            ("bfloat16", "tf32"): ({"tf32"}, {"tf32"}),
            ("float16", "f16"): ({"f16"}, {"tf32"}),         # a state is never rounded to float16 (its range)
            ("float16", "tf32"): ({"tf32"}, {"tf32"})}


@pytest.mark.parametrize("dtype, low_precision", sorted(PRODUCTS))
def test_precision_modes_reach_the_triton_ir(dtype, low_precision):
    """The precisions the GPU runs, which the interpreter cannot (tf32, tf32x3, ex2.approx; the 16-bit operands it
    does emulate: test_kernels.py): each mode's products (the state terms are products with a state), and exp as
    one ex2.approx in every kernel that exponentiates (all but the plain scan, which is handed its decays)."""
    inputs, states = PRODUCTS[dtype, low_precision]
    modules = report.capture(32, dtype, 32, low_precision, T=67)
    assert products(modules["wkv6_state_terms"]) == states | {"bf16"}
    for name in ("wkv6_forward", "wkv6_backward"):
        assert products(modules[name]) == inputs | states | {"bf16"}, name
    for name, ir in modules.items():
        assert ("ex2.approx.ftz.f32" in ir) == (name != "wkv6_scan"), name


@pytest.fixture(scope="module", params=["bfloat16", "float32"])
def compiled(request):
    """(dtype, the compile report of every kernel of N = 64, chunk 32)."""
    import jax

    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is here: the kernels are compiled by XLA's own Triton in test_gpu.py")
    if importlib.util.find_spec("triton") is None:
        pytest.skip("the triton package compiles the IR; it is not installed")
    dtype = request.param
    return dtype, report.compile_reports(report.capture(64, dtype, 32), N=64, dtype=dtype)


def test_kernels_compile_for_hopper(compiled):
    dtype, reports = compiled
    assert {r["kernel"] for r in reports} == KERNELS
    for r in reports:
        assert 0 <= r["smem"] <= HOPPER_SMEM, r


def test_registers_and_tensor_cores(compiled):
    if report.cuobjdump() is None:
        pytest.skip("no cuobjdump in the triton package: registers and MMA instructions cannot be read")
    dtype, reports = compiled
    for r in reports:
        assert r["registers"] <= 255, r
        if r["kernel"] in ("wkv6_state_terms", "wkv6_forward", "wkv6_backward"):
            assert r["mma"] > 0, f"no tensor-core instructions: {r}"


@pytest.mark.parametrize("state_scan", sorted(STATE_SCANS))
def test_packed_kernels_lower_and_compile(state_scan):
    """The kernels of packed sequences (reading the chunk table, restarting the scans per sequence) lower to Triton
    IR and (with the triton package) compile for Hopper within its shared memory, on tensor cores."""
    settings, scans = STATE_SCANS[state_scan]
    modules = report.capture(64, "bfloat16", 32, "bf16", T=2 * 32 + 3, B=3, varlen=True, **settings)
    assert set(modules) == KERNELS - STATE_SCANS["terms+scan"][1] - {"wkv6_recurrent"} | scans
    if importlib.util.find_spec("triton") is None:
        pytest.skip("lowered; the triton package compiles the IR, and it is not installed")
    for r in report.compile_reports(modules, N=64, dtype="bfloat16"):
        assert 0 <= r["smem"] <= HOPPER_SMEM, r
        if r["kernel"] in ("wkv6_forward", "wkv6_backward") and "mma" in r:
            assert r["mma"] > 0, f"no tensor-core instructions: {r}"


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_level_table_kernels_lower_and_compile(dtype):
    """With Settings.mask_table the chunk kernels read the level table (a bfloat16 input loaded at a traced level):
    they lower and (with the triton package) compile for Hopper within its shared memory, on tensor cores."""
    modules = report.capture(64, dtype, 32, T=2 * 32 + 3, mask_table=True)
    built = report.capture(64, dtype, 32, T=2 * 32 + 3)
    chunk_kernels = {name: ir for name, ir in modules.items() if name in ("wkv6_forward", "wkv6_backward")}
    assert len(chunk_kernels) == 2
    for name, ir in chunk_kernels.items():   # the table is one more input than the built masks take
        assert arguments(ir, name) == arguments(built[name], name) + 1, name
    if importlib.util.find_spec("triton") is None:
        pytest.skip("lowered; the triton package compiles the IR, and it is not installed")
    for r in report.compile_reports(chunk_kernels, N=64, dtype=dtype):
        assert 0 <= r["smem"] <= HOPPER_SMEM, r
        if "mma" in r:
            assert r["mma"] > 0 and r["registers"] <= 255, r

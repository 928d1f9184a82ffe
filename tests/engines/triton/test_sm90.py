"""Every launch the Triton engine makes compiles for Hopper (sm_90), also on a machine without a GPU: the interpreter
runs a kernel's Python, not its compilation, so a kernel that would not compile (an operation the compiler lacks, a
type or layout error in a constexpr branch, shared memory past the card's) passes every interpreted test and fails
at its first GPU call. sm90_launches.py records the launches of the operator's GPU paths (each dtype, head sizes 16 to
128, start states or none, packed sequences, the scan regimes and segments, the split backward, the decode and pool
steps) and compiles each distinct one with triton's bundled ptxas, in a process of its own (no interpreter there).
"""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.requires("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
HOPPER_SHARED = 227 * 1024   # bytes of shared memory a block may use on an H100 / H200


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("sm90") / "records.json"
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "tests.engines.triton.sm90_launches", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


def _launch(record):
    return f"{record['kernel']} {record['options']} {record['constexprs']}"


def test_every_kernel_is_launched(compiled):
    launched = {record["kernel"] for record in compiled["records"]}
    assert launched == set(compiled["defined"]), (sorted(set(compiled["defined"]) - launched), sorted(launched))


def test_every_launch_compiles(compiled):
    failed = [_launch(record) + "\n" + record["error"] for record in compiled["records"] if "error" in record]
    assert not failed, f"triton {compiled['triton']}:\n" + "\n\n".join(failed[:5])


def test_shared_memory_fits_hopper(compiled):
    over = [(_launch(record), record["shared"]) for record in compiled["records"]
            if record.get("shared", 0) > HOPPER_SHARED]
    assert not over, over


def test_decode_step_keeps_its_state_in_registers(compiled):
    """The step kernels (decode, pool) stream the state at HBM speed only if nothing goes to the stack."""
    spilled = [(_launch(record), record["stack"]) for record in compiled["records"]
               if record["kernel"] == "step_kernel" and record.get("stack", 0)]
    assert not spilled, spilled

"""Distribution with the Pallas engine on 4 virtual CPU devices (kernels in the Pallas interpreter).

jax fixes its device count when it starts, so benchmarks/shard_jax.py (the same demonstration the 2-GPU machine
runs) runs in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4; the tests read its JSON:
the original documentation's shard_map example, and RWKVKernelOperator under plain jit on inputs sharded over the
batch, the heads, or both, each equal to the unsharded call (values, final state, gradients), with no input
gathered (the custom_partitioning rules of engines/pallas/sharding.py keep each device on its own rows and heads).
"""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.requires("pallas")

# case: the mesh axes the outputs stay sharded over
CASES = {"docs shard_map example (eager)": ["device_axis"], "docs shard_map example (jit)": ["device_axis"],
         "jit, batch sharded": ["data"], "jit, heads sharded": ["model"], "jit, batch and heads sharded": ["data", "model"]}
GRADS = ("dr", "dk", "dv", "dw", "du", "dinit_state")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("shard")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "RWKV6_PALLAS_INTERPRET": "1", "KERAS_BACKEND": "jax", "SIZE": "tiny", "PORTABLE": "0", "OUT": str(out)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "shard_jax.py")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    path = out / "shard_jax.json"
    assert path.exists(), f"shard_jax.py wrote no results (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    data = json.loads(path.read_text())
    data["returncode"], data["log"] = proc.returncode, proc.stdout[-3000:]
    return data


def test_ran_on_four_devices(results):
    assert len(results["devices"]) == 4, results["devices"]
    assert results["returncode"] == 0 and results["ok"], results["log"]


@pytest.mark.parametrize("case", CASES)
def test_case_equals_unsharded_call(results, case):
    """The Pallas kernels ran (read from the traced program, not the script's label), the results equal the
    unsharded call's, the outputs stay sharded, and under plain jit the gradients of all six inputs equal too and
    no input is gathered, forward or backward."""
    rows = [row for row in results["cases"] if row["case"] == case]
    assert len(rows) == 1, f"{case!r} missing: {results['log']}"
    row = rows[0]
    assert row["engine"] == "pallas", row
    assert row["y"] <= 1e-6 and row["state"] <= 1e-6, row
    if case.startswith("jit"):
        assert row["grad_engine"] == "pallas", row
        for key in GRADS:
            assert row[key] <= 1e-6, (key, row)
        assert row["forward_collectives"]["all-gather"] == 0, row
        assert row["grad_collectives"]["all-gather"] == 0, row
    for axis in CASES[case]:   # the outputs stay sharded like the inputs
        assert axis in row["y_spec"] and axis in row["state_spec"], row

"""Sequence parallelism under jax.jit on 4 virtual CPU devices (tests/distributed/jax_cases.py in a subprocess): the
operator on inputs sharded along T (alone, with rows, with heads; segments of 6 or 12 tokens, whose boundaries fall
inside the unsharded call's chunks), strong decays and masks, a start state per row. Outputs, final state and the
gradients of all six inputs equal the unsharded call and the float64 oracle; the outputs stay sharded along T; the
compiled forward and gradient programs exchange only the per-segment pairs (no collective of a T-sized array).
pallas-chunks (segments of whole chunks): the compiled gradient programs, sharded along T or along the rows only,
launch the same kernels as the unwrapped engine's on one device: the backward runs on the forward's chunk states (XLA's
common-subexpression pass off, so that a recomputed kernel is not merged away by the compiler). The wrapper is on by
default (RWKV6_TIME_SHARDING unset); the wrapped Pallas engine vmaps."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import FP32_GRAD, FP32_OUT, ROOT

pytestmark = pytest.mark.requires("jax")
ENGINES = ["portable", pytest.param("pallas", marks=pytest.mark.requires("pallas")),
           pytest.param("pallas-chunks", marks=pytest.mark.requires("pallas"))]
MESHES = ("T over 4 devices", "rows over 2 x T over 2", "heads over 2 x T over 2")
ROWS_ONLY, VMAPPED = "rows over 2", "vmap of 2, unsharded"


def _run(tmp_path, engine, seed):
    out = tmp_path / "jax_cases.json"
    flags = "--xla_force_host_platform_device_count=4"
    if engine == "pallas-chunks":
        flags += " --xla_disable_hlo_passes=cse"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "KERAS_BACKEND": "jax", "PYTHONPATH": str(ROOT)}
    env.pop("RWKV6_TIME_SHARDING", None)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "distributed" / "jax_cases.py"), str(out),
                           str(seed % 2**30), engine], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and out.exists(), f"exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("engine", ENGINES)
def test_time_sharded_equals_unsharded(tmp_path, engine, seed):
    results = _run(tmp_path, engine, seed)
    assert results["devices"] == 4, results
    meshes = list(MESHES) + ([ROWS_ONLY] if engine == "pallas-chunks" else [])
    rows = results["rows"]
    if engine == "pallas":   # the wrapped engine vmaps
        vmapped, rows = rows[0], rows[1:]
        assert vmapped["mesh"] == VMAPPED and len(vmapped["vs_unsharded"]) == 8, vmapped
        for key, error in vmapped["vs_unsharded"].items():
            assert error <= (FP32_OUT if key in ("y", "state") else FP32_GRAD), (key, error)
    assert [row["mesh"] for row in rows] == meshes, rows
    for row in rows:
        assert row["engines"] == [engine.split("-")[0]], row
        if engine == "pallas-chunks":
            assert row["kernels"] == row["kernels_one_device"], row
            assert row["kernels"].get("wkv6_forward") == 1 and row["kernels"].get("wkv6_backward") == 1, row
        for against in ("vs_unsharded", "vs_oracle"):
            errors = row[against]
            assert len(errors) == 8, errors
            for key, error in errors.items():
                assert error <= (FP32_OUT if key in ("y", "state") else FP32_GRAD), (row["mesh"], against, key, error)
        if row["mesh"] == ROWS_ONLY:
            assert "'data'" in row["y_spec"] and not row["forward_collectives"], row
            assert {op for op, _ in row["grad_collectives"]} <= {"all-reduce"}, row   # du summed over the rows
            continue
        T = row["T"]
        assert "'seq'" in row["y_spec"] and "'seq'" in row["y_forward_spec"], row
        # the pairs were exchanged (an all-gather each way), and nothing of T's size: every T-sized array has the
        # factor 3 of T (24 or 192) in its size, none of the pairs (B, H, N and the device counts are powers of two) has
        for program in ("forward_collectives", "grad_collectives"):
            ops = row[program]
            assert any(op == "all-gather" for op, _ in ops), (program, ops)
            for op, shape in ops:
                size = 1
                for d in shape:
                    size *= d
                assert size % 3 and T not in shape, (program, op, shape)

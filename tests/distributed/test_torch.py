"""distributed.sequence_parallel on 3 gloo processes on CPU: each rank passes its slice of T (unequal slices, one of a
single token), and its outputs, the final state and the gradients of r, k, v, w (its slice), u and init_state equal
the whole sequence on one process and the float64 oracle; mismatched shapes raise a clear error on every rank.
The portable engine, and the Triton engine in its interpreter (TRITON_INTERPRET=1)."""
import json
import os

import pytest

from tests.helpers import BF16, FP32_GRAD, FP32_OUT

pytestmark = pytest.mark.requires("torch")
WORLD = 3


def _spawn(tmp_path, engine, seed):
    import torch.multiprocessing as mp

    from tests.distributed import torch_cases

    mp.spawn(torch_cases.run, args=(WORLD, str(tmp_path), engine, seed % 2**30), nprocs=WORLD,
             join=True)
    return [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(WORLD)]


ENGINES = ["portable", pytest.param("triton", marks=pytest.mark.requires("triton"))]


@pytest.mark.parametrize("engine", ENGINES)
def test_sharded_equals_one_process(tmp_path, engine, seed):
    ranks = _spawn(tmp_path, engine, seed)
    for rank, results in enumerate(ranks):
        assert results["engines"] == [engine], results["engines"]
        assert results["cases"], results
        for name, case in results["cases"].items():
            for against in ("vs_one_process", "vs_oracle"):
                errors = case[against]
                assert set(errors) >= {"y", "state", "r", "k", "v", "w", "u"}, errors
                for key, error in errors.items():
                    if case["dtype"] == "float32":
                        tolerance = FP32_OUT if key in ("y", "state") else FP32_GRAD
                    else:
                        tolerance = BF16
                    assert error <= tolerance, (rank, name, against, key, error)
        assert "only T may differ" in (results["mismatch_error"] or ""), results["mismatch_error"]

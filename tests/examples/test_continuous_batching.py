"""examples/continuous_batching.py at a tiny size: requests join and leave a pool of 3 slots, and every request's
output equals generating it alone (the example checks it and returns 1 otherwise). Runs in the torch pass only: one
backend is enough for the example, and under torch the pool is updated in place (on a GPU by the Triton kernel)."""
import importlib.util
import os
import re

import pytest

from tests.helpers import BACKEND

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_continuous_batching_serves_every_request_as_alone(capsys):
    if BACKEND != "torch":
        pytest.skip("runs once, in the torch pass of the suite")
    spec = importlib.util.spec_from_file_location("continuous_batching",
                                                  os.path.join(ROOT, "examples", "continuous_batching.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    status = example.main(["--requests", "5", "--slots", "3", "--max-prompt", "5", "--max-new", "5",
                           "--d-model", "32", "--head-size", "16", "--seed", "1"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "PASS: all 5 requests" in out and "tokens/s" in out
    average = float(re.search(r"([0-9.]+) requests a step on average", out).group(1))
    assert average > 1, "requests must share decode steps"

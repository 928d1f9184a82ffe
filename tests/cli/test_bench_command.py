"""The bench command's pieces on the active backend: timing every pass of an engine, the table, the plot."""
import argparse
import json

import keras
import numpy as np
import pytest
from keras import ops

from rwkv6_keras_operator import engines
from rwkv6_keras_operator.cli import bench


@pytest.mark.parametrize("name", ["fwd", "fwd+bwd", "decode"])
def test_each_pass_runs_and_is_timed(name):
    T = 1 if name == "decode" else 20
    tensors, s0, dy = bench._inputs(2, T, 2, 16, "float32", seed=0, with_state=name == "decode")
    portable = next(engine for engine in engines.available() if engine.NAME == "portable")
    fn = bench._runner(keras.backend.backend(), portable.wkv, tensors, s0, dy, backward=name == "fwd+bwd")
    ms, first = bench._median_ms(fn, repeats=3, budget=0.5)
    assert 0 < ms < 10_000 and first > 0


@pytest.mark.parametrize("engine", engines.available(), ids=lambda engine: engine.NAME)
def test_fwd_bwd_returns_the_loss_of_the_forward(engine, seed):
    """The timed fwd+bwd program computes y, as a training step does: it returns loss = sum(y * dy), which equals the
    forward's. (Returning only the gradients, which do not need y, lets XLA drop the forward's output kernel from
    the timed program: the time would then miss a kernel a training step runs.)"""
    tensors, s0, dy = bench._inputs(1, 45, 2, 64, "float32", seed=seed, with_state=False)
    loss, grads = bench._runner(keras.backend.backend(), engine.wkv, tensors, s0, dy, backward=True)()
    y = engine.wkv(*tensors, s0)[0]
    want = np.sum(ops.convert_to_numpy(y).astype(np.float64) * ops.convert_to_numpy(dy))
    assert abs(float(ops.convert_to_numpy(loss)) - want) <= 1e-5 * np.sum(np.abs(ops.convert_to_numpy(y)))
    assert [tuple(g.shape) for g in grads] == [tuple(x.shape) for x in tensors]


def _records():
    rows = []
    for backend, scale in (("jax", 1.0), ("torch", 2.0)):
        for T in (64, 256):
            for name in bench.PASSES:
                rows.append(dict(kind="time", backend=backend, engine="portable", device="cpu", dtype="float32",
                                 B=2, T=T, H=4, N=64, ms=scale * T / 64 * (3 if name == "fwd+bwd" else 1),
                                 first_s=0.1, device_name="2 CPU cores") | {"pass": name})
        rows.append(dict(kind="time", backend=backend, engine="portable", device="cpu", dtype="float32", B=16,
                         T=1, H=4, N=64, ms=0.25, first_s=0.01, device_name="2 CPU cores") | {"pass": "decode"})
    return rows


def test_table_has_a_row_per_pass_and_the_decode_column():
    lines = bench._table(_records()).splitlines()
    assert lines[0].split()[-3:] == ["T=64", "T=256", "decode"]
    assert [line.split()[4] for line in lines[1:]] == ["fwd", "fwd+bwd", "fwd", "fwd+bwd"]
    assert lines[1].split()[-3:] == ["1", "4", "0.25"] and lines[4].split()[-2:] == ["6", "24"]


def test_from_json_prints_the_table_and_draws_the_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path, png = tmp_path / "results.json", tmp_path / "plot.png"
    path.write_text(json.dumps(_records()))
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(["--from-json", str(path), "--plot", str(png)])) == 0
    assert "fwd+bwd" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""The official RWKV-6 runtime (BlinkDL's `rwkv` pip package: pure PyTorch, CPU, float32) as the model-level
oracle, run in a subprocess of its own: it imports torch, which must stay out of the tensorflow tests' process,
and its module sets torch flags on import.

    run_official(jobs, workdir) -> {job index: [per sequence: {"logits": [per call (T, V)], "states": [...]}]}

A job is {"checkpoint": path to a .pth, "sequences": [[tokens of call 1], [tokens of call 2], ...], ...]}:
every sequence starts from the checkpoint's start state (state=None: zeros, or its time_state) and carries the
state from call to call with `forward(tokens, state, full_output=True)`. "states" holds, per call, the state
after it: a list of n_layer (time-mix shift (C,), WKV state (H, N, N) key x value, channel-mix shift (C,)).

Run directly: python -m tests.models.official REQUEST.json   (writes the .npz that the request names).
"""
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_official(jobs, workdir):
    request = os.path.join(workdir, f"official_request_{os.getpid()}_{id(jobs)}.json")
    out = request[:-5] + ".npz"
    with open(request, "w") as f:
        json.dump({"out": out, "jobs": jobs}, f)
    env = {**os.environ, "RWKV_JIT_ON": "0", "RWKV_CUDA_ON": "0", "RWKV_V7_ON": "0", "PYTHONPATH": os.pathsep.join(
        [ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])}   # the rwkv package may come from PYTHONPATH
    env.pop("KERAS_BACKEND", None)
    done = subprocess.run([sys.executable, "-m", "tests.models.official", request], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"the official runtime failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n"
                           f"{done.stderr[-3000:]}")
    results = {}
    with np.load(out) as data:
        for j, job in enumerate(jobs):
            results[j] = []
            for s, calls in enumerate(job["sequences"]):
                seq = {"logits": [], "states": []}
                for c in range(len(calls)):
                    seq["logits"].append(data[f"{j}/{s}/{c}/logits"])
                    n_layer = int(data[f"{j}/n_layer"])
                    seq["states"].append([tuple(data[f"{j}/{s}/{c}/state/{i}/{p}"] for p in range(3))
                                          for i in range(n_layer)])
                results[j].append(seq)
    return results


def _main(request_path):
    with open(request_path) as f:
        request = json.load(f)
    import torch
    from rwkv.model import RWKV

    torch.set_num_threads(1)
    arrays = {}
    for j, job in enumerate(request["jobs"]):
        model = RWKV(model=job["checkpoint"], strategy="cpu fp32", verbose=False)
        n_layer = model.args.n_layer
        arrays[f"{j}/n_layer"] = np.asarray(n_layer)
        for s, calls in enumerate(job["sequences"]):
            state = None
            for c, tokens in enumerate(calls):
                logits, state = model.forward(list(tokens), state, full_output=True)
                arrays[f"{j}/{s}/{c}/logits"] = logits.reshape(len(tokens), -1).numpy()
                for i in range(n_layer):
                    for p in range(3):
                        arrays[f"{j}/{s}/{c}/state/{i}/{p}"] = state[i * 3 + p].clone().numpy()
    np.savez(request["out"], **arrays)


if __name__ == "__main__":
    _main(sys.argv[1])

"""This project and every peer through their public APIs on one GPU, one process each, then one table.

On the GPU machine, from the repository root (or as `bash scripts/gpu.sh compare`):
    eval "$(bash scripts/peers.sh env)" && python3 benchmarks/peers/compare.py
Each case runs benchmarks/peers/measure.py in its own process: this project (the repository first on the path:
its operator, i.e. the Triton engine under torch and the Pallas engine under jax), fla, rwkv-ops and 1.0.5 (the
peers' directory first: 1.0.5 shares this project's import name, and aborts a process that also loads rwkv-ops).
Env: CASES (comma list of names in CASES; default all), SHAPES (as measure.py), CASE_TIMEOUT (s, default 900),
BUDGET (s for the whole script: each case is cut to what is left; a case stopped keeps what it measured),
OUT (default /tmp): each case's log and peer_results.jsonl under $OUT/compare/NAME/, all records in
$OUT/compare.json. bf16 inputs; torch timed by triton.testing.do_bench (median), jax as the median of calls each
followed by a synchronisation (as jax users call it; jax's dispatch and the host round trip included).
"""
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MEASURE = os.path.join(ROOT, "benchmarks", "peers", "measure.py")
OUT = os.environ.get("OUT", "/tmp")
DEADLINE = time.time() + float(os.environ.get("BUDGET", "1e9"))
# name: (framework, repository first on the path, PEERS, {column: peer name in the records})
CASES = {
    "triton": ("torch", True, "rwkv6_keras_operator", {"this project, Triton (torch)": "rwkv6_keras_operator"}),
    "pallas": ("jax", True, "rwkv6_keras_operator", {"this project, Pallas (jax)": "rwkv6_keras_operator"}),
    "fla": ("torch", False, "fla", {"fla chunk": "fla_chunk", "fla fused_recurrent": "fla_fused_recurrent"}),
    "rwkv_ops": ("jax", False, "rwkv_ops", {"rwkv-ops (jax)": "rwkv_ops"}),
    "v1.0.5": ("torch", False, "rwkv6_keras_operator", {"1.0.5 CUDA (torch)": "rwkv6_keras_operator"}),
}
ROWS = [("train_8x4096_h32", "fwd_ms", "B=8, T=4096, H=32 fwd"), ("train_8x4096_h32", "fwd_bwd_ms", "  fwd+bwd"),
        ("long_1x16384_h32", "fwd_ms", "B=1, T=16384, H=32 fwd"), ("long_1x16384_h32", "fwd_bwd_ms", "  fwd+bwd"),
        ("decode_64x1_h32", "fwd_ms", "decode B=64, T=1, H=32")]


def run_case(name):
    framework, repository_first, peers, _ = CASES[name]
    out = os.path.join(OUT, "compare", name)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "peer_results.jsonl")
    if os.path.exists(path):
        os.remove(path)
    peer_path = os.environ.get("PEER_PYTHONPATH", "")
    env = {**os.environ, "OUT": out, "PEERS": peers, "SKIP_ACC": os.environ.get("SKIP_ACC", "1"),
           "PYTHONPATH": os.pathsep.join(p for p in ((ROOT if repository_first else ""), peer_path) if p),
           "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}   # leave a peer's own CUDA allocations room
    timeout = max(10, int(min(float(os.environ.get("CASE_TIMEOUT", "900")), DEADLINE - time.time() - 10)))
    print(f"== {name} ({framework}, {'repository' if repository_first else 'peers'} first)", flush=True)
    try:
        proc = subprocess.run([sys.executable, MEASURE, framework], env=env, capture_output=True, text=True,
                              timeout=timeout)
        with open(os.path.join(out, "measure.log"), "w") as f:
            f.write(proc.stdout[-50000:] + "\n---- stderr\n" + proc.stderr[-50000:])
    except subprocess.TimeoutExpired:
        print(f"   stopped after {timeout}s; keeping what it measured", flush=True)
    records = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    for record in records:
        if record.get("kind") in ("build", "error", "fatal") or "err" in record:
            print("  ", {k: v for k, v in record.items() if k != "tb"}, flush=True)
    return records


def main():
    names = [n for n in os.environ.get("CASES", ",".join(CASES)).split(",") if n]
    records = {name: run_case(name) for name in names}
    with open(os.path.join(OUT, "compare.json"), "w") as f:
        json.dump(records, f, indent=1)
    columns = [(name, label, peer) for name in names for label, peer in CASES[name][3].items()]

    def ms(name, peer, shape, key):
        for record in records[name]:
            if record.get("kind") == "speed" and record.get("peer") == peer and record.get("shape") == shape:
                return record.get(key)
        return None

    env = next((r for rs in records.values() for r in rs if r.get("kind") == "env" and "gpu" in r), {})
    print(f"\n{env.get('gpu', 'GPU')}, bf16, ms, each through its public API")
    print("| case | " + " | ".join(label for _, label, _ in columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for shape, key, label in ROWS:
        cells = [ms(name, peer, shape, key) for name, _, peer in columns]
        print(f"| {label} | " + " | ".join(f"{c:.3f}" if c else "-" for c in cells) + " |")


if __name__ == "__main__":
    main()

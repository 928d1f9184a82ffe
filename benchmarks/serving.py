"""Serving benchmarks (issue 15), one backend per process: the decode step through the public operator, big batches
against the copy bandwidth measured in the same run, and the state pool (op.step).

    python3 benchmarks/serving.py --backend torch           # Triton engine (+ fla's fused_recurrent_rwkv6)
    python3 benchmarks/serving.py --backend jax             # Pallas engine
    python3 benchmarks/serving.py --backend torch --tiny    # CPU smoke run: tiny shapes, kernels interpreted
    ... --variants    # also the step kernel alone under other launch geometries (engines/step_settings.py)

Cases (H = 32, N = 64, bfloat16 inputs, float32 state in and out; ms a step):
  decode   B = 64: op(r, k, v, w, u, with_state=True, init_state=state) called eagerly (back-to-back calls: the
           host's time per call where it exceeds the GPU's; torch: also with Triton's normal launch, the launcher's
           direct call off), the engine alone, the step replayed in a CUDA graph (torch: device time), inside a
           jitted lax.scan decode loop (jax: per step, the state carried), and flash-linear-attention's
           fused_recurrent_rwkv6 (torch, when importable; its w is the log decay -exp(w)).
  big      B = 4096: state read and written (2.1 GB each way) plus r, k, v, w, y; GB/s achieved, against a copy of
           the state's bytes (device to device) in the same run.
  pool     op.step advancing 64 slots of a pool of 4096, against a plain decode step of 64 rows: torch eager and
           in a CUDA graph; jax in a jitted step (pool or state donated) and inside a jitted lax.scan (a step).
The goals of issue 15 met or not in this run are listed after the table (goal 1: the decode step through op(...);
goal 3: the pool step no slower than a plain decode).

Writes serving_<backend>.json and serving_<backend>.md to --out (default $OUT, else /tmp) and prints the table.
fla is looked for on $PEER_PYTHONPATH too (appended to sys.path). Timings: the median of --repeats runs, each the
mean of --calls calls; on a GPU with CUDA events (torch) or block_until_ready (jax).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FULL = {"H": 32, "N": 64, "decode": 64, "big": 4096, "pool": 4096, "rows": 64, "scan": 100}
TINY = {"H": 2, "N": 16, "decode": 4, "big": 8, "pool": 16, "rows": 4, "scan": 3}
# launch geometries timed with --variants: (tile, per_thread)
VARIANTS = [(1024, 16), (2048, 16), (2048, 32), (4096, 32), (4096, 64), (8192, 64)]


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["torch", "jax"], required=True)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny shapes, kernels interpreted")
    parser.add_argument("--variants", action="store_true", help="also time the step kernel under other geometries")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    parser.add_argument("--calls", type=int, help="calls a timing (default 100; --tiny 3)")
    parser.add_argument("--repeats", type=int, help="timings a number (default 5; --tiny 1)")
    args = parser.parse_args(argv)
    args.calls = args.calls or (3 if args.tiny else 100)
    args.repeats = args.repeats or (1 if args.tiny else 5)
    return args


class Report:
    def __init__(self, backend, shapes):
        self.data = {"backend": backend, "date": time.strftime("%Y-%m-%d %H:%M"), "host": platform.node(),
                     "shapes": shapes, "rows": []}

    def add(self, case, what, ms, nbytes=None, copy_gbps=None, note=""):
        """One row, printed as it comes: ms a step; nbytes moved a step (GB/s), against copy_gbps measured in the same
        run. Returns ms."""
        row = {"case": case, "what": what, "ms": ms, "note": note}
        if nbytes:
            row["GB/s"] = nbytes / ms / 1e6
            if copy_gbps:
                row["copy GB/s"] = copy_gbps
                row["of copy"] = row["GB/s"] / copy_gbps
        self.data["rows"].append(row)
        print(f"  {case:<7} {what:<58} {ms:9.4f} ms" + (f"  {row['GB/s']:8.0f} GB/s" if nbytes else "")
              + (f" ({row['of copy']:.0%} of copy)" if "of copy" in row else "") + (f"  {note}" if note else ""),
              flush=True)
        return ms

    def goal(self, text, ms, limit_ms):
        """One of the issue's goals: ms against the limit (met when ms <= limit_ms)."""
        met = ms is not None and limit_ms is not None and ms <= limit_ms
        self.data.setdefault("goals", []).append({"goal": text, "ms": ms, "limit ms": limit_ms, "met": met})

    def goals(self):
        def ms(x):
            return "not measured" if x is None else f"{x:.4f} ms"

        return "\n".join(f"- {g['goal']}: {ms(g['ms'])} against {ms(g['limit ms'])}: "
                         f"{'met' if g['met'] else 'NOT met'}" for g in self.data.get("goals", []))

    def table(self):
        lines = ["| case | what | ms | GB/s | of copy | note |", "|---|---|---:|---:|---:|---|"]
        for row in self.data["rows"]:
            gbps = f"{row['GB/s']:.0f}" if "GB/s" in row else ""
            frac = f"{row['of copy']:.0%}" if "of copy" in row else ""
            lines.append(f"| {row['case']} | {row['what']} | {row['ms']:.4f} | {gbps} | {frac} | {row['note']} |")
        return "\n".join(lines)

    def write(self, out):
        os.makedirs(out, exist_ok=True)
        name = os.path.join(out, f"serving_{self.data['backend']}")
        with open(name + ".json", "w") as f:
            json.dump(self.data, f, indent=1)
        head = (f"Serving benchmark, {self.data['backend']}, {self.data.get('device', '?')}, {self.data['date']}; "
                f"shapes {self.data['shapes']}\n\n")
        goals = self.goals()
        text = head + self.table() + "\n" + (f"\nGoals of issue 15 (this run):\n{goals}\n" if goals else "")
        with open(name + ".md", "w") as f:
            f.write(text)
        print("\n" + text)
        print(f"\nwrote {name}.json and {name}.md")


def state_bytes(B, H, N, itemsize):
    """Bytes a step moves: the state read and written, r, k, v, w read and y written."""
    return 2 * B * H * N * N * 4 + 5 * B * H * N * itemsize


def median_ms(run, repeats):
    return statistics.median(run() for _ in range(repeats))


def peer_fla():
    """fla's fused_recurrent_rwkv6, or None (benchmarks/peers/fla.py)."""
    from benchmarks.peers.fla import fla_rwkv6

    return fla_rwkv6("fused_recurrent_rwkv6")


def main(argv=None):
    args = parse(argv)
    os.environ["KERAS_BACKEND"] = args.backend
    shapes = TINY if args.tiny else FULL
    if args.backend == "torch":
        from benchmarks.serving_torch import run
    else:
        from benchmarks.serving_jax import run
    report = Report(args.backend, shapes)
    run(args, shapes, report)
    report.write(args.out)
    return report


if __name__ == "__main__":
    main()

"""The torch half of benchmarks/serving.py (run that script): the Triton engine and fla, one process."""
import os
import time

import numpy as np

from benchmarks.serving import VARIANTS, peer_fla, state_bytes


def _setup(tiny):
    if tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")   # read when the kernels are defined: before the import
    import torch

    from rwkv6_keras_operator import engines
    from rwkv6_keras_operator.engines import triton as engine

    if not torch.cuda.is_available():
        if not tiny:
            raise SystemExit("no CUDA device: run with --tiny for the CPU smoke run")
        engine._AVAILABLE = True                                   # CPU tensors stand in for CUDA ones
        engine.supports = lambda r, head_size: True
        engines._CHOSEN.clear()
    return torch, ("cuda" if torch.cuda.is_available() else "cpu")


class Timer:
    def __init__(self, torch, device, calls, repeats):
        self.torch, self.cuda, self.calls, self.repeats = torch, device == "cuda", calls, repeats

    def _once(self, fn):
        torch = self.torch
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(self.calls):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / self.calls
        t = time.perf_counter()
        for _ in range(self.calls):
            fn()
        return (time.perf_counter() - t) / self.calls * 1e3

    def ms(self, fn):
        """Mean ms of back-to-back calls (no synchronisation between them), median of the repeats."""
        fn()
        if self.cuda:
            self.torch.cuda.synchronize()
        return sorted(self._once(fn) for _ in range(self.repeats))[self.repeats // 2]

    def graph_ms(self, fn):
        """Device ms of fn replayed in a CUDA graph (captured after a warm-up), or None off CUDA."""
        torch = self.torch
        if not self.cuda:
            return None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return self.ms(graph.replay)


def _inputs(torch, device, B, H, N, seed, n_state=None):
    g = torch.Generator(device="cpu").manual_seed(seed)
    C = H * N
    r, k, v = (torch.randn(B, 1, C, generator=g) * 0.5 for _ in range(3))
    w = torch.randn(B, 1, C, generator=g) - 1.0
    u = torch.randn(H, N, generator=g) * 0.5
    s = torch.randn(n_state or B, H, N, N, generator=g) * 0.3
    move = lambda x, dt=torch.bfloat16: x.to(device=device, dtype=dt)  # noqa: E731
    return [move(x) for x in (r, k, v, w)], move(u, torch.float32), move(s, torch.float32)


def _oracle_error(x, u, s, y, state, rows=2):
    """Relative error of the first rows of y and state against the float64 oracle."""
    from rwkv6_keras_operator.reference import relative_error, wkv_reference

    N = u.shape[1]
    feed = [t[:rows].float().cpu().numpy() for t in x]
    y_ref, s_ref = wkv_reference(*feed, u.cpu().numpy(), N, s[:rows].cpu().numpy())
    return max(relative_error(y[:rows].float().cpu().numpy(), y_ref),
               relative_error(state[:rows].cpu().numpy(), s_ref))


def run(args, shapes, report):
    torch, device = _setup(args.tiny)
    from rwkv6_keras_operator import RWKVKernelOperator
    from rwkv6_keras_operator.engines.step_settings import StepSettings
    from rwkv6_keras_operator.engines.triton import binding, recurrent

    report.data["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"
    report.data["versions"] = {"torch": torch.__version__, "triton": __import__("triton").__version__}
    print(f"serving benchmark, torch on {report.data['device']}", flush=True)
    timer = Timer(torch, device, args.calls, args.repeats)
    H, N = shapes["H"], shapes["N"]
    op = RWKVKernelOperator(N)
    torch.set_grad_enabled(False)

    # ------------------------------------------------------------------ decode
    B = shapes["decode"]
    x, u, s = _inputs(torch, device, B, H, N, 0)
    y, state = op(*x, u, with_state=True, init_state=s)
    note = f"oracle err {_oracle_error(x, u, s, y, state):.1e}"
    eager = report.add("decode", f"op(...) eager, B={B}", timer.ms(lambda: op(*x, u, with_state=True, init_state=s)),
                       note=note + f"; direct launches {recurrent.LAUNCH.fast_launches}")
    report.goal(f"1, torch: decode B={B} through op(...), eager", eager, 0.045)
    direct = recurrent.LAUNCH.enabled
    recurrent.LAUNCH.enabled = False
    report.add("decode", "op(...) eager, Triton's normal launch (direct call off)",
               timer.ms(lambda: op(*x, u, with_state=True, init_state=s)))
    recurrent.LAUNCH.enabled = direct
    alone = report.add("decode", "engine alone (binding.decode, (B, 1, C))", timer.ms(lambda: binding.decode(*x, u, s)))
    report.goal("1, torch: the same, against 1.5x the engine alone (eager, this run)", eager, 1.5 * alone)
    heads = [t.view(B, 1, H, N) for t in x]
    report.add("decode", "engine alone (binding.wkv, (B, 1, H, N))", timer.ms(lambda: binding.wkv(*heads, u, s)))
    graph = timer.graph_ms(lambda: op(*x, u, with_state=True, init_state=s))
    if graph is not None:
        report.add("decode", "op(...) in a CUDA graph (device time)", graph)
    fla = peer_fla_or_none(args)
    if fla is not None:
        g = (-torch.exp(x[3].float())).to(x[3].dtype)   # fla takes the log decay
        fh = [t.view(B, 1, H, N) for t in x[:3]] + [g.view(B, 1, H, N)]
        o, ht = fla(*fh, u, scale=1.0, initial_state=s, output_final_state=True)
        diff = max(float((o.float().reshape(y.shape) - y.float()).abs().max()), float((ht - state).abs().max()))
        report.add("decode", "fla fused_recurrent_rwkv6 eager", timer.ms(
            lambda: fla(*fh, u, scale=1.0, initial_state=s, output_final_state=True)), note=f"max |diff| {diff:.1e}")

    # ------------------------------------------------------------------ big batch
    B = shapes["big"]
    x, u, s = _inputs(torch, device, B, H, N, 1)
    nbytes = state_bytes_of(B, H, N)
    copy_src, copy_dst = torch.empty(B * H * N * N, device=device), torch.empty(B * H * N * N, device=device)
    copy_ms = timer.ms(lambda: copy_dst.copy_(copy_src))
    copy_gbps = 2 * copy_src.numel() * 4 / copy_ms / 1e6
    report.add("big", f"copy of the state's bytes (torch copy_), B={B}", copy_ms, 2 * copy_src.numel() * 4)
    report.add("big", "op(...) eager", timer.ms(lambda: op(*x, u, with_state=True, init_state=s)), nbytes, copy_gbps)
    report.add("big", "engine alone (binding.decode)", timer.ms(lambda: binding.decode(*x, u, s)), nbytes, copy_gbps)
    graph = timer.graph_ms(lambda: binding.decode(*x, u, s))
    if graph is not None:
        report.add("big", "engine in a CUDA graph (device time)", graph, nbytes, copy_gbps)
    del copy_src, copy_dst

    # ------------------------------------------------------------------ pool
    n, rows = shapes["pool"], shapes["rows"]
    x, u, pool = _inputs(torch, device, rows, H, N, 2, n_state=n)
    slots = torch.as_tensor(np.random.default_rng(2).permutation(n)[:rows], device=device)
    s = pool[slots].clone()
    op.step(*x, u, pool, slots)   # checks the slot tensor once
    stepped = report.add("pool", f"op.step, {rows} of {n} slots, eager", timer.ms(lambda: op.step(*x, u, pool, slots)))
    plain = report.add("pool", f"op(...) plain decode of {rows} rows, eager",
                       timer.ms(lambda: op(*x, u, with_state=True, init_state=s)))
    report.goal(f"3, torch: op.step of {rows} of {n} slots, eager, against a plain decode of {rows} rows", stepped,
                plain)
    graph = timer.graph_ms(lambda: op.step(*x, u, pool, slots))
    if graph is not None:
        report.add("pool", "op.step in a CUDA graph (device time)", graph)
        plain = report.add("pool", "op(...) plain decode in a CUDA graph (device time)",
                           timer.graph_ms(lambda: op(*x, u, with_state=True, init_state=s)))
        report.goal("3, torch: the same in a CUDA graph (device time)", graph, plain)

    # ------------------------------------------------------------------ launch geometries
    if args.variants:
        saved = recurrent.STEP
        for tile, per_thread in VARIANTS:
            recurrent.STEP = StepSettings(tile=tile, per_thread=per_thread)
            geometry = f"BV={recurrent.STEP.columns(N)}, warps={recurrent.STEP.warps(N)}"
            for case in ("decode", "big"):
                B = shapes[case]
                x, u, s = _inputs(torch, device, B, H, N, 3)
                fn = lambda: binding.decode(*x, u, s)  # noqa: E731
                ms = timer.graph_ms(fn) or timer.ms(fn)
                report.add(case, f"variant tile={tile} per_thread={per_thread} ({geometry})", ms,
                           state_bytes_of(B, H, N) if case == "big" else None, copy_gbps if case == "big" else None)
        recurrent.STEP = saved


def state_bytes_of(B, H, N):
    return state_bytes(B, H, N, 2)


def peer_fla_or_none(args):
    return None if args.tiny else peer_fla()   # fla's kernels need a GPU

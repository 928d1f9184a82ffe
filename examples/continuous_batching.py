"""Continuous batching with a pool of recurrent states: the demo's RWKV6 model serves requests of random prompt and
output lengths. Requests join and leave between decode steps; each holds one slot of a pool (per layer: the WKV
states, advanced in place by `RWKVKernelOperator.step`, and the two token-shift vectors). At the end every request's
output is checked against generating it alone.

    KERAS_BACKEND=torch python examples/continuous_batching.py                 # random weights
    KERAS_BACKEND=jax python examples/continuous_batching.py --weights model.weights.h5   # from `demo --save`
    ... --requests 32 --slots 8 --max-prompt 24 --max-new 32 --seed 0

How the model is served without changing it: each time-mixing layer calls its operator as
`op(r, k, v, w, u, with_state=True, init_state=wkv_state)` and returns the state it gets back. The example swaps in
`PoolOperator`, and for a decode step gives every layer PoolRows(pool, slots) as its WKV state: the call becomes
`op.step(r, k, v, w, u, pool, slots)`, and the advanced pool comes back as the layer's new state. A prompt is
prefilled alone (one call over its tokens) and its final states are written into its slot. Decoding is greedy, so
"alone" and "batched" must give the same tokens. Under jax the decode step is one jitted program with the pools
donated (advanced in place by XLA); under torch the Triton engine advances the WKV pool in place.
"""
import argparse
import contextlib
import os
import sys
import time
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from rwkv6_keras_operator import RWKVKernelOperator  # noqa: E402
from rwkv6_keras_operator.demo import corpus  # noqa: E402
from rwkv6_keras_operator.demo.model import RWKV6LM  # noqa: E402
from rwkv6_keras_operator.demo.train import Vocab  # noqa: E402
from rwkv6_keras_operator.engines.portable.recurrent import scatter_rows  # noqa: E402


class PoolRows(NamedTuple):
    """The WKV state a time-mixing layer gets during a decode step: the whole pool and the slot of each row."""

    pool: object
    slots: object


class PoolOperator:
    """Stands in for a time-mixing layer's operator. Given a PoolRows as its start state, the layer's call
    `op(r, k, v, w, u, with_state=True, init_state=PoolRows(pool, slots))` advances the rows `slots` of the pool by
    one token (`op.step`) and returns (y, PoolRows(new pool, slots)); otherwise it is the layer's own operator
    (prefill, and generating alone)."""

    def __init__(self, own, head_size):
        self.own = own
        self.pooled = RWKVKernelOperator(head_size)   # the GPU engine's pool kernel where there is one

    def __call__(self, r, k, v, w, u, with_state=False, init_state=None, state_map=None):
        if isinstance(init_state, PoolRows):
            y, pool = self.pooled.step(r, k, v, w, u, init_state.pool, init_state.slots)
            return y, PoolRows(pool, init_state.slots)
        return self.own(r, k, v, w, u, with_state=with_state, init_state=init_state, state_map=state_map)


def decode_rows(call, pools, slots, tokens):
    """One token for the rows `slots` of the pools: (logits (B, vocab), the pools advanced). call(tokens, state) is
    the model's call_with_state; pools: per layer [token-shift rows (n, C), WKV states (n, H, N, N), channel-mix
    shift rows (n, C)]."""
    state = [(ops.take(tm, slots, axis=0), PoolRows(wkv, slots), ops.take(cm, slots, axis=0)) for tm, wkv, cm in pools]
    logits, state = call(tokens, state)
    pools = [[scatter_rows(tm, slots, ops.cast(new_tm, "float32")), rows.pool,
              scatter_rows(cm, slots, ops.cast(new_cm, "float32"))]
             for (tm, _, cm), (new_tm, rows, new_cm) in zip(pools, state)]
    return logits[:, 0], pools


def compiled_decode(model):
    """decode_rows as one program where the backend compiles eager code best: jax.jit over Keras' stateless call,
    the pools donated (XLA then advances them in place); elsewhere the eager function (torch: the Triton kernel
    updates the pool in place anyway)."""
    if keras.backend.backend() != "jax":
        return lambda pools, slots, tokens: decode_rows(model.call_with_state, pools, slots, tokens)
    import jax

    def run(trainable, non_trainable, pools, slots, tokens):
        call = lambda t, s: model.stateless_call(trainable, non_trainable, (t, s))[0]  # noqa: E731
        return decode_rows(call, pools, slots, tokens)

    jitted = jax.jit(run, donate_argnums=2)
    return lambda pools, slots, tokens: jitted([v.value for v in model.trainable_variables],
                                               [v.value for v in model.non_trainable_variables], pools, slots, tokens)


class Server:
    """The model, its pools and the free slots. A decode step pads its rows to a power of two with free slots (their
    results are dropped), so that compiled backends see a few batch sizes only."""

    def __init__(self, model, slots):
        self.model = model
        for block in model.blocks:
            block.time_mix.operator = PoolOperator(block.time_mix.operator, model.head_size)
        C, H, N = model.d_model, model.d_model // model.head_size, model.head_size
        zeros = lambda *shape: ops.zeros(shape, "float32")  # noqa: E731
        self.pools = [[zeros(slots, C), zeros(slots, H, N, N), zeros(slots, C)] for _ in model.blocks]
        self.capacity = slots
        self.free = list(range(slots))
        self.decode_step = compiled_decode(model)

    def prefill(self, prompt):
        """Take a slot, run the prompt alone, store its final state in the slot: (slot, logits of the last token)."""
        slot = self.free.pop(0)
        logits, state = self.model.call_with_state(np.asarray(prompt, np.int32)[None], None)
        index = ops.convert_to_tensor(np.array([slot], np.int32))
        for pool, layer_state in zip(self.pools, state):
            for i, rows in enumerate(layer_state):
                pool[i] = scatter_rows(pool[i], index, ops.cast(rows, "float32"))
        return slot, logits[0, -1]

    def decode(self, slots, tokens):
        """One token for each active request (slots[b] holds the state of the request whose last token is
        tokens[b]): the logits (B, vocab)."""
        B = len(slots)
        size = min(1 << (B - 1).bit_length(), self.capacity)
        padding = self.free[:size - B]
        index = ops.convert_to_tensor(np.array(list(slots) + padding, np.int32))
        feed = np.array(list(tokens) + [0] * len(padding), np.int32)[:, None]
        logits, self.pools = self.decode_step(self.pools, index, feed)
        return logits[:B]

    def warm_up(self, max_prompt):
        """Compile what serving will run: a prefill of every prompt length (jax compiles eager operations per shape)
        and the decode step of every padded batch size (the free slots' states are overwritten by their next
        prefill)."""
        for length in range(1, max_prompt + 1):
            self.release(self.prefill(np.zeros(length, np.int32))[0])
        size = 1
        while True:
            self.decode(self.free[:size], [0] * size)
            if size >= self.capacity:
                break
            size = min(2 * size, self.capacity)

    def release(self, slot):
        self.free.append(slot)


def greedy(logits):
    return np.asarray(ops.convert_to_numpy(ops.argmax(logits, axis=-1))).reshape(-1)


def serve(server, requests):
    """Serve every request (prompt, n_new) with continuous batching: the generated tokens of each, and counts."""
    waiting = list(range(len(requests)))
    active = {}          # request -> slot
    outputs = {i: [] for i in range(len(requests))}
    steps = batch_sizes = 0
    while waiting or active:
        while waiting and server.free:   # join: prefill alone, then decode with the others
            i = waiting.pop(0)
            slot, logits = server.prefill(requests[i][0])
            outputs[i].append(int(greedy(logits)[0]))
            active[i] = slot
        for i in [i for i in active if len(outputs[i]) == requests[i][1]]:   # leave: done
            server.release(active.pop(i))
        if not active:
            continue
        order = list(active)
        logits = server.decode([active[i] for i in order], [outputs[i][-1] for i in order])
        for i, token in zip(order, greedy(logits)):
            outputs[i].append(int(token))
        steps, batch_sizes = steps + 1, batch_sizes + len(order)
    return outputs, steps, batch_sizes


def alone(model, prompt, n_new):
    """The same request generated by itself: prefill, then one token a call from the carried state."""
    logits, state = model.call_with_state(np.asarray(prompt, np.int32)[None], None)
    out = [int(greedy(logits[0, -1])[0])]
    while len(out) < n_new:
        logits, state = model.call_with_state(np.array([[out[-1]]], np.int32), state)
        out.append(int(greedy(logits[0, -1])[0]))
    return out


def build(vocab_size, args):
    keras.utils.set_random_seed(args.seed)
    model = RWKV6LM(vocab_size, d_model=args.d_model, n_layer=args.layers, head_size=args.head_size)
    model(np.zeros((1, 2), np.int32))
    if args.weights:
        model.load_weights(args.weights)
    else:   # random weights everywhere (the output projections start at zero, which would skip every block)
        rng = np.random.default_rng(args.seed)
        for var in model.weights:
            value = keras.ops.convert_to_numpy(var)
            var.assign(value + rng.standard_normal(value.shape).astype(value.dtype) * 0.3)
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--slots", type=int, default=8, help="states in the pool: requests served at once")
    parser.add_argument("--max-prompt", type=int, default=24)
    parser.add_argument("--max-new", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--head-size", type=int, default=32)
    parser.add_argument("--weights", help="weights saved by `python -m rwkv6_keras_operator demo --save X.weights.h5`")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with inference():
        return run(args)


def inference():
    """torch: no autograd graph (the pools would otherwise chain every step into one); elsewhere nothing to do."""
    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


def run(args):
    text = corpus.load()
    vocab = Vocab.of(text)
    model = build(len(vocab), args)
    rng = np.random.default_rng(args.seed)
    requests = []
    for _ in range(args.requests):
        length = int(rng.integers(1, args.max_prompt + 1))
        start = int(rng.integers(0, len(text) - length))
        requests.append((vocab.encode(text[start:start + length]), int(rng.integers(1, args.max_new + 1))))
    print(f"continuous batching, backend {keras.backend.backend()}: {len(requests)} requests (prompts 1-"
          f"{args.max_prompt}, outputs 1-{args.max_new} tokens), a pool of {args.slots} slots, model d_model "
          f"{args.d_model}, {args.layers} layers, heads of {args.head_size}")

    server = Server(model, args.slots)
    server.warm_up(args.max_prompt)   # compiles kernels and programs: not timed
    start = time.perf_counter()
    outputs, steps, batch_sizes = serve(server, requests)
    seconds = time.perf_counter() - start
    generated = sum(len(out) for out in outputs.values())
    print(f"served {generated} tokens in {seconds:.2f} s: {generated / seconds:.1f} tokens/s "
          f"({steps} decode steps, {batch_sizes / max(steps, 1):.1f} requests a step on average)")
    for i in range(min(3, len(requests))):
        print(f"  [{vocab.decode(requests[i][0])}] -> {vocab.decode(outputs[i])!r}")

    wrong = [i for i, (prompt, n_new) in enumerate(requests) if alone(model, prompt, n_new) != outputs[i]]
    if wrong:
        print(f"FAIL: {len(wrong)} of {len(requests)} requests differ from generating them alone: {wrong}")
        return 1
    print(f"PASS: all {len(requests)} requests equal generating each alone")
    return 0


if __name__ == "__main__":
    sys.exit(main())

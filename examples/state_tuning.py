"""State tuning an RWKV-6 model: every weight frozen, only the per-layer start states trained, then exported as
an official checkpoint with `blocks.{i}.att.time_state` (what RWKV-LM's state tuning produces).

    KERAS_BACKEND=jax python examples/state_tuning.py --checkpoint RWKV-x060-World-1B6-v2.1-20240328-ctx4096.pth
    KERAS_BACKEND=jax python examples/state_tuning.py          # offline: a small model with random weights

The corpus is the package's own (rwkv6_keras_operator/demo/corpus.txt), tokenized with the World tokenizer;
90% trains, 10% is held out. Prints the held-out loss before, during and after training, writes the tuned
checkpoint (--out), and, when the official runtime (`pip install rwkv`, needs torch) is installed, loads that
file there and compares its logits with this model's.

Without --checkpoint the base model has random weights in realistic ranges (RWKV6Config below): its start
states move its predictions only a little towards the corpus (the held-out loss falls, but stays far above the
corpus' unigram entropy): this run shows the mechanics and the export. With a real checkpoint the states steer
a trained model to the corpus' style.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import keras  # noqa: E402

from rwkv6_keras_operator.demo import corpus  # noqa: E402
from rwkv6_keras_operator.models import RWKV6, RWKV6Config  # noqa: E402
from rwkv6_keras_operator.models.checkpoint import random_weights  # noqa: E402
from rwkv6_keras_operator.models.tokenizer import WorldTokenizer  # noqa: E402
from rwkv6_keras_operator.reference import relative_error  # noqa: E402

OFFLINE = RWKV6Config(vocab_size=65536, n_embd=64, n_layer=2, head_size=16, dim_ffn=224, mix_lora=8, decay_lora=16)

# Run in a process of its own: the official runtime imports torch and sets torch flags at import.
OFFICIAL = """
import os, sys, numpy as np
os.environ["RWKV_JIT_ON"] = "0"; os.environ["RWKV_CUDA_ON"] = "0"
from rwkv.model import RWKV
model = RWKV(model=sys.argv[1], strategy="cpu fp32", verbose=False)
tokens = np.load(sys.argv[2])
logits, _ = model.forward(tokens.tolist(), None, full_output=True)
np.save(sys.argv[3], logits.numpy())
"""


def windows(ids, count, length, rng):
    starts = rng.integers(0, len(ids) - length - 1, count)
    return np.stack([ids[s:s + length + 1] for s in starts]).astype(np.int32)


def unigram_entropy(ids):
    counts = np.bincount(ids).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def official_logits(path, tokens):
    """The official runtime's logits for `tokens` from the checkpoint at `path`, or None without `rwkv`."""
    try:
        import importlib.util

        if importlib.util.find_spec("rwkv") is None or importlib.util.find_spec("torch") is None:
            return None
    except ValueError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        np.save(os.path.join(tmp, "tokens.npy"), np.asarray(tokens))
        out = os.path.join(tmp, "logits.npy")
        subprocess.run([sys.executable, "-c", OFFICIAL, path, os.path.join(tmp, "tokens.npy"), out], check=True,
                       env={k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"})
        return np.load(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="an official RWKV-6 World checkpoint (default: a small random model)")
    parser.add_argument("--out", default="state_tuned.pth", help="the tuned checkpoint (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps-per-epoch", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per training window")
    parser.add_argument("--lr", type=float, default=1.0,
                        help="Adam's learning rate for the states (RWKV-LM's state tuning uses 1)")
    parser.add_argument("--dtype", default=None, help="Keras dtype policy, e.g. mixed_bfloat16 on a GPU")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    started = time.time()

    if args.checkpoint:
        model = RWKV6.from_checkpoint(args.checkpoint, dtype=args.dtype)
        print(f"base model: {args.checkpoint}")
    else:
        model = RWKV6(OFFLINE, dtype=args.dtype)
        model.load_checkpoint_weights(random_weights(OFFLINE, seed=args.seed))
        print(f"base model: random weights, {OFFLINE}")
    cfg = model.config
    tokenizer = WorldTokenizer()
    ids = np.asarray(tokenizer.encode(corpus.load()), np.int32)
    split = int(len(ids) * 0.9)
    train_ids, held_ids = ids[:split], ids[split:]
    print(f"corpus: {len(ids):,} World tokens ({len(np.unique(ids))} distinct); unigram entropy "
          f"{unigram_entropy(train_ids):.2f} nats/token")

    model.set_trainable(weights=False, start_states=True)
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    print(f"trainable: the {cfg.n_layer} start states, {trainable:,} numbers; frozen: {model.count_params() - trainable:,}")
    model.compile(optimizer=keras.optimizers.Adam(args.lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    held = windows(held_ids, 4 * args.batch_size, args.seq_len, rng)
    data = windows(train_ids, args.epochs * args.steps_per_epoch * args.batch_size, args.seq_len, rng)
    before = float(model.evaluate(held[:, :-1], held[:, 1:], batch_size=args.batch_size, verbose=0))
    print(f"held-out loss before state tuning: {before:.3f} nats/token")
    model.fit(data[:, :-1], data[:, 1:], batch_size=args.batch_size, epochs=args.epochs, shuffle=False,
              steps_per_epoch=args.steps_per_epoch, validation_data=(held[:, :-1], held[:, 1:]),
              verbose=1 if sys.stdout.isatty() else 2)
    after = float(model.evaluate(held[:, :-1], held[:, 1:], batch_size=args.batch_size, verbose=0))
    print(f"held-out loss after state tuning:  {after:.3f} nats/token ({after - before:+.3f})")

    path = model.save_checkpoint(args.out)
    print(f"wrote {path} (the weights and blocks.{{i}}.att.time_state, official layout)")
    tokens = held[0, :64]
    theirs = official_logits(os.path.abspath(path), tokens)
    ok = after < before
    if theirs is None:
        print("(install the official runtime, `pip install rwkv`, to check the file there)")
    else:
        ours = np.asarray(keras.ops.convert_to_numpy(model(tokens[None])))[0]
        err = relative_error(ours, theirs)
        tolerance = 1e-5 if model.dtype_policy.name == "float32" else 2e-2
        print(f"the official runtime on {path}: logits within {err:.1e} of this model's (relative L2, "
              f"tolerance {tolerance:.0e}) {'PASS' if err <= tolerance else 'FAIL'}")
        ok = ok and err <= tolerance
    print(f"done in {time.time() - started:.0f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

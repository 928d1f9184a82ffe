"""`demo`: train a small RWKV6 language model whose time-mixing calls RWKVKernelOperator, then generate.

Trains on the corpus shipped with the package (no download) with Keras' fit and progress bar, shows the
held-out loss against the corpus' unigram entropy, prints samples, and checks that the operator's state
carries the sequence: token-by-token generation (T = 1, init_state = the previous state) and prefill +
continue both reproduce the full-sequence logits. Runs under the backend in KERAS_BACKEND.
"""
import sys
import textwrap
import time

DESCRIPTION = ("Train a small RWKV6 character model on the bundled corpus (about 3 minutes on 2 CPU cores), "
               "show it learned, generate text with the carried state, and check stepwise == full sequence.")
TOLERANCE = 1e-4  # relative L2, float32 logits
PROMPTS = ("The keeper ", "Tomas went ", '"Every bell')  # one length: one compiled prefill


def add_arguments(parser):
    parser.add_argument("--epochs", type=int, default=6,
                        help="training epochs (default: %(default)s; e.g. 30 for a longer run; 0: no training)")
    parser.add_argument("--steps-per-epoch", type=int, default=50, help="default: %(default)s")
    parser.add_argument("--batch-size", type=int, default=32, help="default: %(default)s")
    parser.add_argument("--seq-len", type=int, default=128, help="training window in characters (default: %(default)s)")
    parser.add_argument("--d-model", type=int, default=128, help="default: %(default)s")
    parser.add_argument("--layers", type=int, default=2, help="RWKV6 blocks (default: %(default)s)")
    parser.add_argument("--head-size", type=int, default=32, help="default: %(default)s")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: %(default)s)")
    parser.add_argument("--sample-chars", type=int, default=160, help="characters per sample (default: %(default)s; 0: no samples)")
    parser.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    parser.add_argument("--save", metavar="PATH",
                        help="save the trained model: PATH.keras (whole model) or PATH.weights.h5 (weights)")
    parser.add_argument("--load", metavar="PATH",
                        help="start from a model saved with --save (same --d-model/--layers/--head-size)")


def _minutes(seconds):
    return f"{int(seconds // 60)}m {seconds % 60:04.1f}s" if seconds >= 60 else f"{seconds:.1f}s"


def _engine(head_size, seq_len):
    """(engine name, device) that a call of the model's shape gets here."""
    from keras import ops

    from .. import engines
    from .backends import device_of

    probe = ops.zeros((1, seq_len, 1, head_size))
    return engines.select(probe, head_size, ops_loop=False).NAME, device_of(probe)


def _float32_matmuls():
    """GPUs run float32 matrix products in TF32 (a 10-bit mantissa) by default under jax and tensorflow: the
    stepwise-vs-full check compares float32 results, so the demo asks for full float32 products there."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")
    elif backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_tensor_float_32_execution(False)
    else:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def _load(path, model):
    import keras

    if path.endswith(".keras"):
        loaded = keras.models.load_model(path)
        model.set_weights(loaded.get_weights())
    else:
        model.load_weights(path)


def run(args):
    import keras
    import numpy as np

    from ..demo import corpus
    from ..demo.train import Vocab, build_model, consistency, generate, nats_to_bits, unigram_entropy, windows

    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    started = time.time()
    engine, device = _engine(args.head_size, args.seq_len)
    print(f"RWKV6 demo: a character-level RWKV6 language model in Keras 3 (backend {keras.backend.backend()}, "
          f"engine {engine} on {device})")
    if device == "gpu":
        _float32_matmuls()
        print("float32 matrix products at full precision (no TF32), so that stepwise == full sequence can be "
              "checked to float32 tolerance")

    text = corpus.load()
    vocab = Vocab.of(text)
    ids = vocab.encode(text)
    split = int(len(ids) * 0.9)
    train_ids, held_ids = ids[:split], ids[split:]
    entropy = unigram_entropy(train_ids, len(vocab))
    print(f"corpus: {len(text):,} characters, {len(vocab)} distinct (shipped with the package: demo/corpus.txt); "
          f"{len(train_ids):,} for training, {len(held_ids):,} held out")

    total_steps = args.epochs * args.steps_per_epoch
    model = build_model(len(vocab), args.d_model, args.layers, args.head_size, args.lr, total_steps)
    print(f"model: d_model {args.d_model}, {args.layers} RWKV6 blocks of {args.d_model // args.head_size} heads x "
          f"{args.head_size}, {model.count_params():,} parameters")
    if args.load:
        _load(args.load, model)
        print(f"loaded weights from {args.load}")

    held = windows(held_ids, 2 * args.batch_size, args.seq_len, rng)  # validation = evaluation: one compile
    if total_steps:
        print(f"training: {args.epochs} epoch(s) x {args.steps_per_epoch} steps, batch {args.batch_size} x "
              f"{args.seq_len} characters, Adam (peak lr {args.lr}, cosine)")
        data = windows(train_ids, total_steps * args.batch_size, args.seq_len, rng)
        t0 = time.time()
        model.fit(data[:, :-1], data[:, 1:], batch_size=args.batch_size, epochs=args.epochs, shuffle=False,
                  steps_per_epoch=args.steps_per_epoch,  # each epoch takes the next batches of `data`
                  validation_data=(held[:, :-1], held[:, 1:]), verbose=1 if sys.stdout.isatty() else 2)
        print(f"trained in {_minutes(time.time() - t0)}")

    loss = float(model.evaluate(held[:, :-1], held[:, 1:], batch_size=args.batch_size, verbose=0))
    learned = loss < 0.75 * entropy
    print(f"\nunigram entropy of the corpus: {entropy:.3f} nats/char ({nats_to_bits(entropy):.2f} bits): "
          "the best loss without context")
    print(f"held-out loss of the model:    {loss:.3f} nats/char ({nats_to_bits(loss):.2f} bits): "
          + (f"{loss / entropy:.0%} of it, the model learned" if learned else "not clearly below it yet "
             "(train longer: --epochs 30)"))

    if args.sample_chars:
        print(f"\nsamples (prompt prefilled in one call, then {args.sample_chars} characters one at a time from "
              f"the carried state, temperature {args.temperature}; ¶ = paragraph break):")
    for i, prompt in enumerate(PROMPTS if args.sample_chars else ()):
        out = generate(model, vocab.encode(prompt), args.sample_chars, args.temperature, seed=args.seed + i)
        print(textwrap.fill(f"[{prompt}]{vocab.decode(out)}".replace("\n\n", " ¶ ").replace("\n", " "), width=100,
                            initial_indent="  ", subsequent_indent="  "))

    n = 2 * args.seq_len
    check = held_ids[:n]
    errors = consistency(model, check, prefill=n // 2)
    ok = all(e <= TOLERANCE for e in errors.values())
    print(f"\nthe state carries the sequence: logits of {n} held-out characters, three ways (relative L2 error "
          f"against one call over all {n}; float32 tolerance {TOLERANCE:.0e})")
    rows = [("token by token: T = 1, with_state=True, init_state = previous state", errors["stepwise"]),
            (f"prefill {n // 2} in one call, then {n - n // 2} steps from its final state", errors["prefill"]),
            ("final WKV states, token by token vs one call", errors["state"])]
    for label, err in rows:
        print(f"  {label:<72}{err:9.1e}  {'PASS' if err <= TOLERANCE else 'FAIL'}")

    if args.save:
        if args.save.endswith(".keras"):
            model.save(args.save)
        else:
            model.save_weights(args.save if args.save.endswith(".weights.h5") else args.save + ".weights.h5")
        print(f"\nsaved the model to {args.save}")
    trained = bool(total_steps or args.load)
    passed = ok and (learned or not trained)
    verdict = ("the model learned, and stepwise == full sequence" if trained else "stepwise == full sequence "
               "(untrained model: --epochs 0)") if passed else "SOME CHECKS FAILED"
    print(f"\ndone in {_minutes(time.time() - started)}: {verdict}")
    return 0 if passed else 1

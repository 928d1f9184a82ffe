"""`generate`: load an official RWKV-6 checkpoint and continue a prompt, printing the text as it comes.

    python -m rwkv6_keras_operator generate --checkpoint RWKV-x060-World-1B6-v2.1-20240328-ctx4096.pth \
        --prompt "The Eiffel tower is in the city of"

Encodes the prompt with the World tokenizer, prefills it in one call, then samples one token at a time from
the carried state. Runs under the backend in KERAS_BACKEND (jax, torch or tensorflow).
"""
import sys
import time

DESCRIPTION = ("Continue a prompt with an official RWKV-6 checkpoint (.pth or .safetensors), streaming the text "
               "(World tokenizer).")


def add_arguments(parser):
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="an RWKV-6 checkpoint in the official layout (.pth needs torch; .safetensors needs "
                             "the safetensors package)")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="default: %(default)s")
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=0.7,
                        help="nucleus sampling: keep the most likely tokens up to this probability "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampler (default: random)")
    parser.add_argument("--dtype", default=None,
                        help="Keras dtype policy, e.g. float32, mixed_bfloat16, bfloat16 (default: Keras' global "
                             "policy, float32 unless configured)")


def run(args):
    import keras

    from ..models import RWKV6
    from ..models.tokenizer import WorldTokenizer

    started = time.time()
    model = RWKV6.from_checkpoint(args.checkpoint, dtype=args.dtype)
    cfg = model.config
    print(f"RWKV-6 {cfg.n_layer} layers x {cfg.n_embd} ({cfg.n_head} heads of {cfg.head_size}), vocabulary "
          f"{cfg.vocab_size}, {model.count_params():,} parameters; backend {keras.backend.backend()}; loaded in "
          f"{time.time() - started:.1f}s", file=sys.stderr)
    tokenizer = WorldTokenizer()
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        print("error: --prompt must not be empty", file=sys.stderr)
        return 2
    decode = tokenizer.stream_decoder()
    sys.stdout.write(args.prompt)
    sys.stdout.flush()

    def show(tokens):
        sys.stdout.write(decode(tokens[:1]))
        sys.stdout.flush()

    started = time.time()
    model.generate(prompt, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                   on_tokens=show)
    elapsed = time.time() - started
    sys.stdout.write(decode([], final=True) + "\n")
    print(f"{args.max_new_tokens} tokens in {elapsed:.1f}s (prompt: {len(prompt)} tokens)", file=sys.stderr)
    return 0

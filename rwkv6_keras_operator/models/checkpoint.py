"""RWKV-6 checkpoints in the official layout (RWKV-LM v6, the `rwkv` pip package's "x060"): reading, writing,
the RWKV version a file holds, and the model configuration that its shapes imply.

Keys and shapes of an RWKV-6 checkpoint (C = n_embd, H heads of N = head_size, C = H * N, F = dim_ffn,
R = mix_lora, D = decay_lora, V = vocab_size; linear weights are torch's (out, in)):

    emb.weight (V, C)                          blocks.0.ln0.weight/bias (C,)
    blocks.{i}.ln1.weight/bias, ln2.weight/bias (C,)
    blocks.{i}.att.time_maa_x/w/k/v/r/g (1, 1, C)
    blocks.{i}.att.time_maa_w1 (C, 5R)         blocks.{i}.att.time_maa_w2 (5, R, C)
    blocks.{i}.att.time_decay (1, 1, C)        blocks.{i}.att.time_decay_w1 (C, D), time_decay_w2 (D, C)
    blocks.{i}.att.time_faaaa (H, N)           blocks.{i}.att.receptance/key/value/gate.weight (C, C)
    blocks.{i}.att.output.weight (C, C)        blocks.{i}.att.ln_x.weight/bias (C,)
    blocks.{i}.att.time_state (H, N, N)        optional (state-tuned files), stored (head, value, key)
    blocks.{i}.ffn.time_maa_k/r (1, 1, C)      blocks.{i}.ffn.key.weight (F, C), receptance.weight (C, C),
    blocks.{i}.ffn.value.weight (C, F)         ln_out.weight/bias (C,), head.weight (V, C)

`time_*` tensors are accepted with any extra axes of size 1 (the official runtime squeezes them).
"""
import os
import re
from dataclasses import asdict, dataclass

import numpy as np

SUFFIXES = (".pth", ".safetensors")


class CheckpointError(ValueError):
    """A file that is not a loadable RWKV-6 checkpoint; the message says what is wrong."""


@dataclass(frozen=True)
class RWKV6Config:
    """The sizes of an RWKV-6 model (all of them follow from a checkpoint's shapes)."""

    vocab_size: int
    n_embd: int
    n_layer: int
    head_size: int
    dim_ffn: int
    mix_lora: int
    decay_lora: int

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"RWKV6Config.{name} must be a positive int; got {value!r}.")
        if self.n_embd % self.head_size:
            raise ValueError(f"RWKV6Config.n_embd ({self.n_embd}) must be a multiple of head_size "
                             f"({self.head_size}).")

    @property
    def n_head(self):
        return self.n_embd // self.head_size

    def to_dict(self):
        return {name: int(value) for name, value in asdict(self).items()}

    def checkpoint_shapes(self, time_state=False):
        """{key: shape} of a checkpoint of this configuration, in the official layout."""
        C, H, N, F = self.n_embd, self.n_head, self.head_size, self.dim_ffn
        vector = (1, 1, C)
        shapes = {"emb.weight": (self.vocab_size, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,)}
        for i in range(self.n_layer):
            b, att, ffn = f"blocks.{i}.", f"blocks.{i}.att.", f"blocks.{i}.ffn."
            for name in ("ln1", "ln2"):
                shapes[f"{b}{name}.weight"] = shapes[f"{b}{name}.bias"] = (C,)
            for name in "xwkvrg":
                shapes[f"{att}time_maa_{name}"] = vector
            shapes[f"{att}time_maa_w1"] = (C, 5 * self.mix_lora)
            shapes[f"{att}time_maa_w2"] = (5, self.mix_lora, C)
            shapes[f"{att}time_decay"] = vector
            shapes[f"{att}time_decay_w1"] = (C, self.decay_lora)
            shapes[f"{att}time_decay_w2"] = (self.decay_lora, C)
            shapes[f"{att}time_faaaa"] = (H, N)
            for name in ("receptance", "key", "value", "gate", "output"):
                shapes[f"{att}{name}.weight"] = (C, C)
            shapes[f"{att}ln_x.weight"] = shapes[f"{att}ln_x.bias"] = (C,)
            if time_state:
                shapes[f"{att}time_state"] = (H, N, N)
            shapes[f"{ffn}time_maa_k"] = shapes[f"{ffn}time_maa_r"] = vector
            shapes[f"{ffn}key.weight"] = (F, C)
            shapes[f"{ffn}receptance.weight"] = (C, C)
            shapes[f"{ffn}value.weight"] = (C, F)
        shapes["ln_out.weight"] = shapes["ln_out.bias"] = (C,)
        shapes["head.weight"] = (self.vocab_size, C)
        return shapes


def detect_version(keys):
    """The RWKV generation of a checkpoint from its key names, the way the official runtime tells them apart:
    "7" (x070: `att.w0`, `att.r_k`, ...), "6" (x060: `time_maa`), "5" (`ln_x` without `time_maa`), else "4"."""
    keys = list(keys)
    if any(re.search(r"\.att\.(w0|r_k|k_k|a0|x_r)$", key) for key in keys):
        return "7"
    if any("time_maa" in key for key in keys):
        return "6"
    if any(".ln_x." in key for key in keys):
        return "5"
    return "4"


def config_from_weights(weights):
    """The RWKV6Config that a checkpoint's shapes imply (weights: {key: array}); raises CheckpointError for
    another RWKV version or when a tensor that the sizes come from is missing."""
    version = detect_version(weights)
    if version != "6":
        raise CheckpointError(f"this is an RWKV-{version} checkpoint (found from its key names); RWKV6 loads "
                              f"RWKV-6 (\"x060\", Finch) checkpoints only.")
    needed = ("emb.weight", "blocks.0.att.time_faaaa", "blocks.0.att.time_maa_w1",
              "blocks.0.att.time_decay_w1", "blocks.0.ffn.key.weight")
    missing = [key for key in needed if key not in weights]
    if missing:
        raise CheckpointError("the checkpoint lacks tensors that the model's sizes come from: " + ", ".join(missing))
    layers = {int(m.group(1)) for key in weights for m in [re.match(r"blocks\.(\d+)\.", key)] if m}
    vocab_size, n_embd = np.shape(weights["emb.weight"])
    faaaa = np.shape(weights["blocks.0.att.time_faaaa"])
    if len(faaaa) != 2:
        raise CheckpointError(f"blocks.0.att.time_faaaa must be (heads, head_size); got shape {faaaa}.")
    mix_shape = np.shape(weights["blocks.0.att.time_maa_w1"])
    if len(mix_shape) != 2 or mix_shape[1] % 5:
        raise CheckpointError(f"blocks.0.att.time_maa_w1 must be (n_embd, 5 * mix_lora); got shape {mix_shape}.")
    try:
        return RWKV6Config(vocab_size=int(vocab_size), n_embd=int(n_embd), n_layer=max(layers) + 1,
                           head_size=int(faaaa[1]), dim_ffn=int(np.shape(weights["blocks.0.ffn.key.weight"])[0]),
                           mix_lora=int(mix_shape[1] // 5),
                           decay_lora=int(np.shape(weights["blocks.0.att.time_decay_w1"])[1]))
    except ValueError as error:
        raise CheckpointError(f"the checkpoint's shapes do not make an RWKV-6 model: {error}") from None


def _squeezed(shape):
    return tuple(d for d in shape if d != 1)


def has_time_state(weights):
    return any(key.endswith(".att.time_state") for key in weights)


def validate(weights, config):
    """Raises one CheckpointError listing every missing, unexpected and mis-shaped key."""
    expected = config.checkpoint_shapes(time_state=has_time_state(weights))
    missing = [key for key in expected if key not in weights]
    unexpected = [key for key in weights if key not in expected]
    misshaped = []
    for key, shape in expected.items():
        if key in weights:
            got = tuple(np.shape(weights[key]))
            same = _squeezed(got) == _squeezed(shape) if ".time_" in key else got == shape
            if not same:
                misshaped.append(f"{key}: {got}, expected {shape}")
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            problems.append(f"{len(items)} {title}: " + "; ".join(items))
    if problems:
        raise CheckpointError(f"the checkpoint does not match an RWKV-6 model of {config}:\n  " + "\n  ".join(problems))


def resolve_path(path):
    """The checkpoint file: `path` itself, or `path`.pth (the official runtime also takes the name without it)."""
    path = os.fspath(path)
    if not os.path.exists(path) and os.path.exists(path + ".pth"):
        path += ".pth"
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    return path


def _suffix(path):
    for suffix in SUFFIXES:
        if path.endswith(suffix):
            return suffix
    raise ValueError(f"checkpoint files are .pth or .safetensors; got {path!r}.")


def _import_torch():
    try:
        import torch
    except ImportError:
        raise ImportError("reading and writing .pth checkpoints needs PyTorch (`pip install torch`, a CPU build is "
                          "enough); .safetensors files need only `pip install safetensors`.") from None
    return torch


def _import_safetensors():
    try:
        import safetensors.numpy
    except ImportError:
        raise ImportError(".safetensors checkpoints need the safetensors package: "
                          "`pip install safetensors` (or `pip install \"rwkv6-keras-operator[models]\"`).") from None
    return safetensors


def _torch_to_numpy(tensor):
    """A CPU tensor as NumPy in its own dtype, without a copy (bfloat16 as ml_dtypes.bfloat16): a released 14B
    model in float32 copies would need 56 GB."""
    import torch

    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def read_checkpoint(path):
    """{key: NumPy array in the file's dtype (bfloat16 as ml_dtypes.bfloat16)} of a .pth (needs torch) or
    .safetensors (needs safetensors) checkpoint."""
    path = resolve_path(path)
    if _suffix(path) == ".safetensors":
        safetensors = _import_safetensors()
        with safetensors.safe_open(path, framework="numpy") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    torch = _import_torch()
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a dict of tensors.")
    if "_strategy" in state:
        raise CheckpointError(f"{path} was converted by the rwkv package for a strategy ({state['_strategy']!r}); "
                              f"load the original RWKV-LM checkpoint instead.")
    weights = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise CheckpointError(f"{path}: entry {key!r} is not a floating-point tensor.")
        weights[key] = _torch_to_numpy(value)
    return weights


def write_checkpoint(path, weights, dtype="float32"):
    """Writes {key: array} as .pth (torch.save, needs torch) or .safetensors; dtype "float32" or "bfloat16"."""
    path = os.fspath(path)
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"`dtype` must be 'float32' or 'bfloat16'; got {dtype!r}.")
    if _suffix(path) == ".safetensors":
        safetensors = _import_safetensors()
        if dtype == "bfloat16":
            import ml_dtypes

            numpy_dtype = ml_dtypes.bfloat16
        else:
            numpy_dtype = np.float32
        safetensors.numpy.save_file({k: np.ascontiguousarray(v, numpy_dtype) for k, v in weights.items()}, path)
        return path
    torch = _import_torch()
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v, np.float32)).to(torch_dtype)
                for k, v in weights.items()}, path)
    return path


def random_weights(config, seed=0, time_state=False):
    """{key: float32 array} of a checkpoint with random weights in realistic ranges (tests, benchmarks): mixes in
    [0, 1], decays from ~1 (w = -6) to ~0.01 (w = 1.5), LayerNorm weights near 1, LoRAs large enough to matter,
    projections scaled by 1/sqrt(fan-in), start states of order 1 when `time_state`."""
    rng = np.random.default_rng(seed)
    C, F = config.n_embd, config.dim_ffn

    def normal(shape, scale):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    weights = {}
    for key, shape in config.checkpoint_shapes(time_state=time_state).items():
        leaf = key.rsplit(".", 1)[-1]
        if re.search(r"(ln\d|ln_out|ln_x)\.weight$", key):
            value = 1.0 + normal(shape, 0.1)
        elif leaf == "bias":
            value = normal(shape, 0.1)
        elif leaf.startswith("time_maa_") and leaf[-1] not in "12":
            value = rng.uniform(0.0, 1.0, shape)
        elif leaf in ("time_maa_w1", "time_maa_w2", "time_decay_w1", "time_decay_w2"):
            value = normal(shape, 0.1)
        elif leaf == "time_decay":
            value = rng.uniform(-6.0, 1.5, shape)
        elif leaf == "time_faaaa":
            value = 0.3 + normal(shape, 0.5)
        elif leaf == "time_state":
            value = normal(shape, 0.5)
        elif key == "emb.weight":
            value = normal(shape, 0.5)
        elif key.endswith(".ffn.value.weight"):
            value = normal(shape, F ** -0.5)
        else:
            value = normal(shape, C ** -0.5)
        weights[key] = np.asarray(value, np.float32)
    return weights

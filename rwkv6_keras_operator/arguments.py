"""Checking and normalising the operator's arguments.

Every check names the argument and what was expected. Shapes are checked wherever they are known (also while
tracing); the range of `state_map` is checked when its values are known, i.e. outside jax.jit, tf.function,
torch.compile and CUDA-graph capture.

The checks of shapes and dtypes run once per signature (the shapes and dtypes of all arguments): their outcome, a
`Plan` of what the engine needs done to the arguments, is cached, so a decode loop calling the operator with the
same shapes again pays for a dict lookup, not for the checks. Values (state_map's range) are checked on every call.
"""
from dataclasses import dataclass, replace
from typing import NamedTuple

import keras
import numpy as np
from keras import ops

INPUT_DTYPES = ("float32", "bfloat16", "float16")


class Prepared(NamedTuple):
    """Engine-ready arguments: r, k, v, w as (B, T, H, N); u (H, N) float32; s0 (B, H, N, N) float32 or None."""

    r: object
    k: object
    v: object
    w: object
    u: object
    s0: object
    shape: tuple  # (B, T, C) of the inputs


@dataclass(frozen=True)
class Plan:
    """What the checks of one signature found, and what the engine needs done to the arguments.

    shape: (B, T, C) of r (None where unknown while tracing); heads: H; u_flat: u came as (C,); state: "none",
    "rows" (one per row, or an unknown batch that must match), "shared" (one state for all rows) or "mapped"
    (state_map); state_rank3: init_state came as (H, N, N); n_state: its number of states."""

    shape: tuple
    heads: int
    head_size: int
    u_flat: bool = False
    state: str = "none"
    state_rank3: bool = False
    n_state: object = None

    @property
    def static(self):
        """Every dimension is known: the plan may be cached and reused."""
        return None not in self.shape


_PLANS = {}
MAX_PLANS = 1024   # distinct signatures kept (a training loop over many lengths makes one each)
_DTYPE_NAMES = {}


def dtype_name(x):
    """The dtype's Keras name ("float32", ...); memoised: a call needs about ten, and a decode step is short."""
    name = _DTYPE_NAMES.get(x.dtype)
    if name is None:
        name = _DTYPE_NAMES[x.dtype] = keras.backend.standardize_dtype(x.dtype)
    return name


def _torch_tensor_type():
    if keras.backend.backend() != "torch":
        return None
    import torch

    return torch.Tensor


def _keras_device_type():
    if keras.backend.backend() != "torch":
        return None
    from keras.src.backend.torch.core import get_device

    return str(get_device()).split(":")[0]


_TORCH_TENSOR = _torch_tensor_type()   # the backend is fixed once keras is imported


def _torch_compiling_check():
    if _TORCH_TENSOR is None:
        return lambda: False
    import torch

    return torch.compiler.is_compiling


# Under torch.compile's tracing (the torch backend; False elsewhere): no import statement a call on the decode path.
torch_compiling = _torch_compiling_check()
_TORCH_ON_CPU = _keras_device_type() == "cpu"


def is_torch_tensor(x):
    """True for torch tensors: keras.ops flattens its arguments looking for symbolic tensors, which under torch
    costs about as much host time as a whole decode step takes on the GPU; a torch tensor reshapes and casts
    itself (also under torch.compile, where a shape may hold symbolic ints)."""
    return _TORCH_TENSOR is not None and isinstance(x, _TORCH_TENSOR)


def _jax_array_type():
    if keras.backend.backend() != "jax":
        return None
    import jax

    return jax.Array


_JAX_ARRAY = _jax_array_type()


def _placed(x):
    """ops.convert_to_tensor would return x as it is: a jax array (or tracer), or a torch tensor on a GPU or on Keras'
    own device (Keras moves only a tensor that is not on its device, and the GPU engines run where the inputs are)."""
    if _TORCH_TENSOR is not None:
        return isinstance(x, _TORCH_TENSOR) and (x.is_cuda or (_TORCH_ON_CPU and x.is_cpu))
    return _JAX_ARRAY is not None and isinstance(x, _JAX_ARRAY)


def to_tensor(x):
    """ops.convert_to_tensor, without its cost (it looks for symbolic tensors) where it would return x."""
    if _placed(x):
        return x
    return ops.convert_to_tensor(x)


def reshape(x, shape):
    return x.reshape(shape) if is_torch_tensor(x) else ops.reshape(x, shape)


def to_float32(x):
    if dtype_name(x) == "float32":
        return x
    return x.float() if is_torch_tensor(x) else ops.cast(x, "float32")


def _is_float(dtype):
    return "float" in dtype


def values_readable(x):
    """The values of backend tensor x can be read now: not while tracing (jax.jit, tf.function, torch.compile) or
    capturing a CUDA graph, where reading them would need a host sync that is not allowed."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return not isinstance(x, jax.core.Tracer)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.executing_eagerly()
    if backend == "torch":
        import torch

        return not (torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing()))
    return True


def known_values(x):
    """NumPy values of a backend tensor, or None while tracing (no host sync is forced there)."""
    return ops.convert_to_numpy(x) if values_readable(x) else None


def shape_of(x):
    return tuple(x.shape)


def key_shape(x):
    """x's shape as part of a cache key: torch.Size and jax shapes are tuples already (tensorflow's TensorShape is
    made one)."""
    return x.shape if _SHAPES_ARE_TUPLES else tuple(x.shape)


_SHAPES_ARE_TUPLES = keras.backend.backend() in ("torch", "jax")


# ------------------------------------------------------------------------------------------------ the checks
def check_rkvw(tensors, shape_ok, expected):
    """tensors: name -> r, k, v, w. Each of a shape that shape_ok accepts (else a ValueError that names `expected`)
    and of an input dtype, all four alike. Returns r's shape."""
    for name, x in tensors.items():
        if not shape_ok(shape_of(x)):
            raise ValueError(f"`{name}` must have shape {expected}; got shape {shape_of(x)}.")
        if dtype_name(x) not in INPUT_DTYPES:
            raise TypeError(f"`{name}` must be one of {', '.join(INPUT_DTYPES)}; got dtype {dtype_name(x)}.")
    shape, dtype = shape_of(tensors["r"]), dtype_name(tensors["r"])
    for name in "kvw":
        if shape_of(tensors[name]) != shape:
            raise ValueError(f"`{name}` must have the shape of `r`, {shape}; got {shape_of(tensors[name])}.")
        if dtype_name(tensors[name]) != dtype:
            raise TypeError(f"`{name}` must have the dtype of `r`, {dtype}; got {dtype_name(tensors[name])}.")
    return shape


def check_channels(C, head_size):
    if C is None or C % head_size:
        raise ValueError(f"The channel size of `r` ({C}) must be a multiple of head_size ({head_size}).")


def _check_inputs(head_size, tensors):
    """tensors: name -> r, k, v, w. Returns (B, T, C)."""
    shape = check_rkvw(tensors, lambda s: len(s) == 3, "(batch, time, channels)")
    B, T, C = shape
    if T is not None and T < 1:
        raise ValueError(f"`r` must hold at least one time step; got shape {shape}.")
    check_channels(C, head_size)
    return shape


def _check_float(name, x, expected):
    if not _is_float(dtype_name(x)):
        raise TypeError(f"`{name}` must be a float tensor of shape {expected}; got dtype {dtype_name(x)}.")


def check_bonus(u, H, N):
    if u is None:
        raise TypeError(f"`u` is required: a float tensor of shape ({H}, {N}) or ({H * N},); got None.")
    _check_float("u", u, f"({H}, {N}) or ({H * N},)")
    if shape_of(u) not in ((H, N), (H * N,)):
        raise ValueError(f"`u` must have shape ({H}, {N}) or ({H * N},); got {shape_of(u)}.")
    return shape_of(u) == (H * N,)


# What the start states are given for: the rows of a batch, or the sequences packed into one row (cu_seqlens);
# the errors name them: (one of them, several of them, B of them).
ROWS = ("batch row", "rows", "a batch of {}")
SEQUENCES = ("sequence", "sequences", "{} sequences")


def _check_state_map(state_map, B, unit=ROWS):
    """state_map as a NumPy array (list, tuple, NumPy) or a backend tensor, its dtype and shape checked."""
    if isinstance(state_map, (list, tuple, np.ndarray)):
        state_map = np.asarray(state_map)
        if state_map.dtype.kind not in "iu":
            raise TypeError(f"`state_map` must hold integers; got dtype {state_map.dtype}.")
    else:
        state_map = to_tensor(state_map)
        if "int" not in dtype_name(state_map):
            raise TypeError(f"`state_map` must hold integers; got dtype {dtype_name(state_map)}.")
    if len(state_map.shape) != 1 or (B is not None and state_map.shape[0] not in (None, B)):
        raise ValueError(f"`state_map` must have shape ({B},) (one index per {unit[0]}); got {shape_of(state_map)}.")
    return state_map


def _check_start_state(init_state, state_map, B, H, N, unit=ROWS):
    """(how the start states are formed, init_state was (H, N, N), its number of states). B: the number of start
    states needed (of `unit`: ROWS or SEQUENCES)."""
    one, several, count = unit
    expected = f"(n, {H}, {N}, {N}) or ({H}, {N}, {N})"
    if init_state is None:
        if state_map is not None:
            raise ValueError(f"`state_map` was given without `init_state`: it maps {several} to states of "
                             "init_state.")
        return "none", False, None
    _check_float("init_state", init_state, expected)
    shape = shape_of(init_state)
    rank3 = len(shape) == 3
    if rank3:
        shape = (1, *shape)
    if len(shape) != 4 or shape[1:] != (H, N, N):
        raise ValueError(f"`init_state` must have shape {expected}; got {shape_of(init_state)}.")
    n = shape[0]
    if state_map is None:
        if n == B or (B is None and n != 1):
            return "rows", rank3, n   # an unknown batch must then match n: checked by the engine's shapes
        if n == 1:
            return "shared", rank3, n
        raise ValueError(
            f"`init_state` holds {n} states for {count.format(B)}: pass `state_map` ({B} ints in [0, {n})) to say "
            f"which state each {one} starts from, or give 1 state (shared) or {B} states (one per {one}).")
    _check_state_map(state_map, B, unit)
    return "mapped", rank3, n


def _make_plan(head_size, r, k, v, w, u, init_state, state_map):
    B, T, C = _check_inputs(head_size, {"r": r, "k": k, "v": v, "w": w})
    H, N = C // head_size, head_size
    u_flat = check_bonus(u, H, N)
    state, rank3, n = _check_start_state(init_state, state_map, B, H, N)
    return Plan((B, T, C), H, N, u_flat, state, rank3, n)


def _signature(head_size, r, k, v, w, u, init_state, state_map):
    """The cache key of a call: every shape and dtype the checks look at (state_map: its kind, dtype and shape)."""
    mapping = None if state_map is None else (type(state_map), state_map.dtype, key_shape(state_map))
    start = None if init_state is None else (key_shape(init_state), init_state.dtype)
    return (head_size, key_shape(r), r.dtype, key_shape(k), k.dtype, key_shape(v), v.dtype, key_shape(w), w.dtype,
            key_shape(u), u.dtype, start, mapping)


def _cacheable():
    """Plans are cached except under torch.compile, whose tracer would have to follow the cache (shapes may be
    symbolic there, and its graph is built once anyway)."""
    return not torch_compiling()


def cached(signature, make):
    """make() (a plan: every check of one signature), run once per signature() and then taken from the cache."""
    key = None
    if _cacheable():
        try:
            key = signature()
            found = _PLANS.get(key)
        except (TypeError, AttributeError):   # unhashable (symbolic dims of some tracers), or no shape: check
            key = found = None
        if found is not None:
            return found
    made = make()
    if key is not None and made.static:
        if len(_PLANS) >= MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = made
    return made


def plan(head_size, r, k, v, w, u, init_state=None, state_map=None):
    """The Plan of converted tensors r, k, v, w, u (or None: an error naming it), init_state (or None) and
    state_map (None, NumPy or a backend tensor): checked, or taken from the cache."""
    if u is None:
        return _make_plan(head_size, r, k, v, w, u, init_state, state_map)
    return cached(lambda: _signature(head_size, r, k, v, w, u, init_state, state_map),
                  lambda: _make_plan(head_size, r, k, v, w, u, init_state, state_map))


_EAGER_PLANS = {}


def eager_torch_plan(head_size, r, k, v, w, u, init_state):
    """The Plan of an eager torch call (no state_map) whose tensors need no conversion (`convert` would return them
    as they are), or None where the call must take the full path (convert, then plan).

    The shortest path from a decode step's call to its launch: one key of every tensor's shape, dtype and device
    looks the plan up; the plan of a new key is made by `plan` (every check, every error) once."""
    if _TORCH_TENSOR is None or torch_compiling():
        return None
    try:
        key = (head_size, r.shape, r.dtype, r.device, k.shape, k.dtype, k.device, v.shape, v.dtype, v.device,
               w.shape, w.dtype, w.device, u.shape, u.dtype, u.device,
               None if init_state is None else (init_state.shape, init_state.dtype, init_state.device))
    except AttributeError:   # not tensors (lists, NumPy): converted on the full path
        return None
    found = _EAGER_PLANS.get(key)
    if found is None:
        tensors = (r, k, v, w, u) if init_state is None else (r, k, v, w, u, init_state)
        if not all(_placed(x) for x in tensors):
            return None
        found = plan(head_size, r, k, v, w, u, init_state)
        if len(_EAGER_PLANS) >= MAX_PLANS:
            _EAGER_PLANS.clear()
        _EAGER_PLANS[key] = found
    return found


# ------------------------------------------------------------------------------------------------ normalising
def _require(name, x, expected):
    if x is None:
        raise TypeError(f"`{name}` is required: {expected}; got None.")
    if hasattr(x, "dtype") and dtype_name(x) not in INPUT_DTYPES:   # as given: jax would make NumPy float64 float32
        raise TypeError(f"`{name}` must be one of {', '.join(INPUT_DTYPES)}; got dtype {dtype_name(x)}.")
    return to_tensor(x)


def _start_state(p, init_state, state_map, batch, unit=ROWS):
    """(B, H, N, N) float32 start states, or None for zeros. batch: an int, or a scalar tensor while tracing."""
    if p.state == "none":
        return None
    H, N = p.heads, p.head_size
    if p.state_rank3:
        init_state = reshape(init_state, (1, H, N, N))
    states = to_float32(init_state)
    if p.state == "rows":
        return states
    if p.state == "shared":
        if isinstance(batch, int) and batch == 1:
            return states
        if is_torch_tensor(states):
            return states.expand(batch, H, N, N)   # a view (the Triton step reads it with a row stride of 0)
        return ops.broadcast_to(states, (batch, H, N, N))
    state_map = _check_state_map(state_map, p.shape[0], unit)
    values = state_map if isinstance(state_map, np.ndarray) else known_values(state_map)
    n = p.n_state
    if values is not None and n is not None and values.size and (values.min() < 0 or values.max() >= n):
        raise ValueError(f"`state_map` values must lie in [0, {n}) (init_state holds {n} states); "
                         f"got values in [{values.min()}, {values.max()}].")
    return ops.take(states, ops.cast(state_map, "int32"), axis=0)


def convert(r, k, v, w, u, init_state, state_map):
    """The arguments as backend tensors (r, k, v and w are required; u is checked with the shapes it must have);
    a state_map given as a list or tuple becomes a NumPy array."""
    if isinstance(state_map, (list, tuple)):
        state_map = np.asarray(state_map)
    if _placed(r) and _placed(k) and _placed(v) and _placed(w) and _placed(u) and (
            init_state is None or _placed(init_state)):
        return r, k, v, w, u, init_state, state_map   # the common case under torch and jax: nothing to convert
    tensors = [_require(name, x, "a (batch, time, channels) float tensor") for name, x in zip("rkvw", (r, k, v, w))]
    tensors.append(None if u is None else to_tensor(u))
    tensors.append(None if init_state is None else to_tensor(init_state))
    tensors.append(state_map)
    return tensors


def prepare(head_size, r, k, v, w, u, init_state=None, state_map=None):
    r, k, v, w, u, init_state, state_map = convert(r, k, v, w, u, init_state, state_map)
    p = plan(head_size, r, k, v, w, u, init_state, state_map)
    return apply(p, r, k, v, w, u, init_state, state_map)


def apply(p, r, k, v, w, u, init_state=None, state_map=None, split_heads=True):
    """Prepared arguments from converted tensors whose signature gave the plan `p`; r, k, v, w stay (B, T, C) unless
    split_heads."""
    B, T, C = p.shape
    H, N = p.heads, p.head_size
    if B is None or T is None:
        batch, time = ops.shape(r)[:2]   # scalar tensors for the dims unknown while tracing
    else:
        batch, time = B, T
    if split_heads:
        heads = (batch, time, H, N)
        r, k, v, w = reshape(r, heads), reshape(k, heads), reshape(v, heads), reshape(w, heads)
    return Prepared(r, k, v, w, bonus(p, u), _start_state(p, init_state, state_map, batch), (B, T, C))


def bonus(p, u):
    """u as the engines take it: (H, N) float32 (p: a Plan, or pool_arguments.StepPlan)."""
    return to_float32(reshape(u, (p.heads, p.head_size)) if p.u_flat else u)


def start_state(p, r, init_state=None, state_map=None):
    """The (B, H, N, N) float32 start states of converted tensors whose plan is `p` (apply's s0), or None."""
    if p.state == "none":
        return None
    B = p.shape[0]
    return _start_state(p, init_state, state_map, B if B is not None else ops.shape(r)[0])


def sequence_start_states(p, init_state, state_map, n):
    """(n, H, N, N) float32 start states of n packed sequences, or None for zeros; p: the plan of the inputs (made
    without start states). init_state holds n states, 1 (shared), or any number with a state_map of n indices."""
    state, rank3, n_state = _check_start_state(init_state, state_map, n, p.heads, p.head_size, SEQUENCES)
    sequences = replace(p, shape=(n, *p.shape[1:]), state=state, state_rank3=rank3, n_state=n_state)
    return _start_state(sequences, init_state, state_map, n, SEQUENCES)

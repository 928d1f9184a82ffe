"""rwkv6-keras-operator: the RWKV6 WKV operator for Keras 3 (jax, torch, tensorflow).

    from rwkv6_keras_operator import RWKVKernelOperator
    op = RWKVKernelOperator(head_size=64, max_sequence_length=4096)
    y, state = op(r, k, v, w, u, with_state=True)
"""
import importlib.util
import os
import sys

__version__ = "2.0.0.dev0"   # the package's one version (pyproject.toml reads it from here)


def _settle_backend():
    """Runs before Keras is imported (import this package first for it to apply).

    - KERAS_BACKEND=pytorch, the spelling of the original documentation, means torch.
    - With no backend chosen at all (no KERAS_BACKEND, no ~/.keras/keras.json), Keras would pick tensorflow
      and fail where only jax or torch is installed: pick the first installed of jax, torch instead.
    """
    if "keras" in sys.modules:
        return
    backend = os.environ.get("KERAS_BACKEND", "").strip().lower()
    if backend == "pytorch":
        os.environ["KERAS_BACKEND"] = "torch"
    elif not backend:
        config = os.path.join(os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras")), "keras.json")
        if not os.path.exists(config) and importlib.util.find_spec("tensorflow") is None:
            for candidate in ("jax", "torch"):
                if importlib.util.find_spec(candidate) is not None:
                    os.environ["KERAS_BACKEND"] = candidate
                    break


_settle_backend()

from .layer import RWKVKernelLayer  # noqa: E402
from .operator import RWKVKernelOperator  # noqa: E402

__all__ = ["RWKVKernelLayer", "RWKVKernelOperator", "__version__"]

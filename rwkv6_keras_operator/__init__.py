"""rwkv6-keras-operator: the RWKV6 WKV operator for Keras 3 (jax, torch, tensorflow).

    from rwkv6_keras_operator import RWKVKernelOperator
    op = RWKVKernelOperator(head_size=64, max_sequence_length=4096)
    y, state = op(r, k, v, w, u, with_state=True)
"""
import os

# The original documentation spells the torch backend "pytorch"; Keras only knows "torch". This must run
# before Keras is imported, so import this package first.
if os.environ.get("KERAS_BACKEND", "").strip().lower() == "pytorch":
    os.environ["KERAS_BACKEND"] = "torch"

from .operator import RWKVKernelOperator  # noqa: E402
from .layer import RWKVKernelLayer  # noqa: E402

__version__ = "2.0.0.dev0"
__all__ = ["RWKVKernelOperator", "RWKVKernelLayer", "__version__"]

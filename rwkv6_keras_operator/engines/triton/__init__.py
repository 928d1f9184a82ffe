"""The triton engine (torch backend, CUDA GPUs): not built yet; is_available() is False so calls run portable."""
NAME = "triton"
BACKEND = "torch"


def is_available():
    return False


def supports(r, head_size):
    return False


def wkv(r, k, v, w, u, s0):
    raise NotImplementedError("the triton engine is not built yet")

"""The pallas engine (jax backend, CUDA GPUs): not built yet; is_available() is False so calls run portable."""
NAME = "pallas"
BACKEND = "jax"


def is_available():
    return False


def supports(r, head_size):
    return False


def wkv(r, k, v, w, u, s0):
    raise NotImplementedError("the pallas engine is not built yet")

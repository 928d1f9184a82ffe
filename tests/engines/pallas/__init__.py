import contextlib


@contextlib.contextmanager
def tuning(**settings):
    """The Pallas engine with some of common.TUNING overridden. Settings are read when a kernel is traced, so jax's
    caches are dropped on the way in and out."""
    import jax

    from rwkv6_keras_operator.engines.pallas import common

    saved = {key: common.TUNING[key] for key in settings}
    common.TUNING.update(settings)
    jax.clear_caches()
    try:
        yield
    finally:
        common.TUNING.update(saved)
        jax.clear_caches()

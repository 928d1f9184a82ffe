"""fla's RWKV-6 ops for the benchmarks that time them in their own process, looked for on $PEER_PYTHONPATH too
(scripts/peers.sh installs the peers off the default import path; appended, so this project shadows their 1.0.5)."""
import importlib
import os
import sys


def fla_rwkv6(name):
    """fla.ops.rwkv6.<name> (e.g. "chunk_rwkv6", "fused_recurrent_rwkv6"), or None when fla cannot be imported."""
    for path in os.environ.get("PEER_PYTHONPATH", "").split(os.pathsep):
        if path and path not in sys.path:
            sys.path.append(path)
    try:
        return getattr(importlib.import_module("fla.ops.rwkv6"), name)
    except Exception as error:  # noqa: BLE001  (any import failure means: no peer in this run)
        print(f"  (fla not importable: {type(error).__name__}: {error})")
        return None

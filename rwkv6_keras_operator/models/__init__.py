"""Official RWKV-6 ("x060", Finch) language models in Keras 3: BlinkDL's checkpoints, the World tokenizer,
generation, fine-tuning and state tuning, with the WKV through RWKVKernelOperator.

    from rwkv6_keras_operator.models import RWKV6, WorldTokenizer
    model = RWKV6.from_checkpoint("RWKV-x060-World-1B6-v2.1-20240328-ctx4096.pth")
    tokenizer = WorldTokenizer()
    new = model.generate([tokenizer.encode("The Eiffel tower is in")], 20, top_p=0.7, seed=0)
    print(tokenizer.decode(new[0]))
"""
from .checkpoint import CheckpointError, RWKV6Config, read_checkpoint, write_checkpoint
from .rwkv6 import RWKV6
from .tokenizer import WorldTokenizer

__all__ = ["CheckpointError", "RWKV6", "RWKV6Config", "WorldTokenizer", "read_checkpoint", "write_checkpoint"]

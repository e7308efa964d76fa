"""The tiny CCAFL models: small enough for tests and the CPU demo.

* `config` - `tiny_config` / `create_tiny_model`: randomly initialised tiny models (``tiny``: a ViT
  image tower, ``tiny-rn50``: CLIP's modified ResNet);
* `tokenizer` - `build_tiny_tokenizer`: the small CLIP BPE tokenizer built in code;
* `pretraining` - ``tiny-pretrained``: the tiny CLIP contrastively pre-trained on captioned synthetic
  people (`load_tiny_pretrained`; the default recipe's weights ship as ``tiny-pretrained.safetensors``,
  rebuilt with ``python -m ccafl_hf.tiny.pretraining``). Imported on demand: it needs the data readers.
"""

from .config import TINY_MODELS, TINY_RESNET_VISION, create_tiny_model, tiny_config
from .tokenizer import TINY_VOCAB_WORDS, build_tiny_tokenizer

__all__ = ["TINY_MODELS", "TINY_RESNET_VISION", "TINY_VOCAB_WORDS", "build_tiny_tokenizer", "create_tiny_model",
           "tiny_config"]

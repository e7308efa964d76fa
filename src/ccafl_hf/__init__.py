"""ccafl-hf: CLIP-based camera-agnostic feature learning for intra-camera supervised person ReID.

Importing the package registers `CCAFLConfig` / `CCAFLModel` with transformers' Auto classes, and
marks them for custom-code export so saved checkpoints load with
``AutoModel.from_pretrained(path, trust_remote_code=True)`` where ccafl_hf is not installed.
"""

from transformers import AutoConfig, AutoModel

from .configuration_ccafl import CCAFLConfig, CCAFLResNetVisionConfig
from .errors import CCAFLError
from .modeling_ccafl import CCAFLModel, CCAFLOutput, resize_position_embeddings
from .modeling_ccafl_resnet import CCAFLResNetVisionModel
from .processing import build_image_processor, build_reid_processor, load_tokenizer
from .tiny import build_tiny_tokenizer, create_tiny_model, tiny_config
from .utils.moved import install_moved_modules

__version__ = "0.3.2"

install_moved_modules()  # ccafl_hf.precision, ccafl_hf.cache, ...: their old import paths, for one release

AutoConfig.register(CCAFLConfig.model_type, CCAFLConfig, exist_ok=True)
AutoConfig.register(CCAFLResNetVisionConfig.model_type, CCAFLResNetVisionConfig, exist_ok=True)
AutoModel.register(CCAFLConfig, CCAFLModel, exist_ok=True)
CCAFLConfig.register_for_auto_class()
CCAFLModel.register_for_auto_class("AutoModel")

__all__ = [
    "CCAFLConfig",
    "CCAFLError",
    "CCAFLModel",
    "CCAFLOutput",
    "CCAFLResNetVisionConfig",
    "CCAFLResNetVisionModel",
    "build_image_processor",
    "build_reid_processor",
    "build_tiny_tokenizer",
    "create_tiny_model",
    "load_tokenizer",
    "resize_position_embeddings",
    "tiny_config",
]

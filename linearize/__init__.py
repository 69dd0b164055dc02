"""linearize: turn pretrained Hugging Face LLMs into linear-time models.

    import linearize
    model = linearize.convert(model, linearize.LinearizeConfig(method="liger-gla"))
    with linearize.teacher(model):   # the original softmax attention, same weights
        ...
    model.save_pretrained("out"); linearize.load("out")
"""
from .cache import LinearizeCache
from .model_folder import CheckpointError, load, register_auto_classes
from .config import METHODS, ConfigError, LinearizeConfig
from .convert import convert, is_linearized, mixers, new_parameters, teacher, unconvert
from .families import FAMILIES, UnsupportedArchitectureError
from .sparse_cache import set_sparse_cache

register_auto_classes()

__version__ = "0.1.0"

__all__ = [
    "LinearizeConfig", "ConfigError", "METHODS", "convert", "unconvert", "teacher", "is_linearized", "mixers",
    "new_parameters", "load", "CheckpointError", "LinearizeCache", "FAMILIES", "UnsupportedArchitectureError",
    "set_sparse_cache",
]

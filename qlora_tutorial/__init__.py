"""qlora_tutorial: the companion package of "QLoRA, built up by hand".

Names are imported lazily: importing the package costs nothing until a name is used.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Qlora_4_bit": "layer",
    "quantize_model": "quantize",
    "count_parameters": "quantize",
    "print_trainable": "quantize",
    "pick_device": "device",
    "seed_everything": "device",
    "start_chapter": "device",
    "load_model": "models",
    "load_tokenizer": "models",
    "tinyllama_config": "models",
    "load_quotes": "data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)

"""qlora_tutorial: the companion package of "QLoRA, built up by hand".

Each chapter runs code from here. Read the modules in this order; each one uses only those above it:

    chapter (site number = file number)  module     what it holds
    2   book/02_lora                    lora         LoRA math: scale, init, update, merge, counts, targets
    3   book/03_number_formats          formats      float formats; absmax, zero-point, blockwise int8
    4   book/04_nf4                     nf4          the 4-bit codes (NF4, FP4, INT4), blockwise 4-bit
    5   book/05_double_quant_memory     nf4          ... and the 8-bit code of double quantization
    6   book/06_layer                   layer        Qlora_4_bit: a frozen (4-bit) base plus W_a, W_b
    7   book/07_quantize_model          quantize     quantize_model, freezing, logical parameter counts
    8   book/08_finetune                train        the Trainer set-up, tokenising, evaluation
    9   book/09_adapters                adapters     save/load, PEFT export/import, merge, whole models
    10  book/10_standard_stack          (all above)  the same recipe with transformers + PEFT + bitsandbytes
    11  book/11_inside_the_layer        matmul4bit   the 4-bit matmul as an autograd.Function; diagrams
    5, 8-12                             memory       the bytes of weights, gradients, optimizer states,
                                                     activations (one rule for 4-bit weights)
    12  book/12_memory_speed            bench        the measured memory and speed suite
    13  book/13_making_it_fast          fast         compiled and CUDA-graph training steps; nf4_triton,
                                                     the NF4 dequantization kernel in Triton
    12  book/12_memory_speed            fsdp         FSDP2 sharding of 4-bit models (torchrun entry point)
    14  book/14_variants                variants     an 8-bit (LLM.int8) base, DoRA, LoRA+; bench.quality,
                                                     the 4-bit against 16-bit study on the date task

Around them: ``device`` (device, dtype, seeds, versions; every chapter's first cell), ``models``
and ``data`` (the offline model and data, chapter 1 on), ``tasks`` and ``evaluate`` (the date task
and perplexity, chapters 7 to 9), ``doctor`` (``python -m qlora_tutorial doctor``). The book's and
CI's tooling is not part of the package: it lives in ``tools/`` of the repository.

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

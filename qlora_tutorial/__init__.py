"""qlora_tutorial: the companion package of "QLoRA, built up by hand".

Each chapter runs code from here. Read the modules in this order; each one imports only modules
above it in this list (``tests/test_imports.py`` checks it, imports inside functions included):

    module      chapter   what it holds
    device      1         device, dtype, seeds, versions (every chapter's first cell)
    models      1         the offline model (SmolLM2-135M-Instruct), model configs, random models
    data        1         the quotes dataset the package ships
    lora        2         LoRA math: scale, init, update, merge, counts, targets; DoRA's form of the update
    formats     3         float formats; absmax, zero-point, blockwise int8
    nf4         4, 5      the 4-bit codes (NF4, FP4, INT4), blockwise 4-bit, double quantization, State4bit
    matmul4bit  11        the 4-bit matmul as one autograd.Function, and its dequantization backends
    layer       6, 14     Qlora_4_bit: a frozen base (DenseBase, Base4bit, Base8bit) plus W_a, W_b
    quantize    7         quantize_model, freezing, logical parameter counts
    tasks       7-9       the date task and its scoring
    evaluate    7         perplexity, fake-quantized models
    train       8         the Trainer set-up, tokenising, generation, evaluation
    adapters    9         save/load, PEFT export/import, merge, whole-model checkpoints (one job per module)
    memory      5, 8-12   the bytes of weights, gradients, optimizer states, activations (one byte accounting)
    diagrams    11        the layer's drawing
    ----------  above the core: these plug in from above, and nothing listed before imports them
    nf4_triton  13        the NF4 dequantization kernel in Triton, registered as a backend of matmul4bit
    fused       13        fusions of the fast path: the head and loss in chunks, activations offloaded to the host
    fast        13        compiled and CUDA-graph training steps
    variants    14        LoRA+ (the 8-bit base and DoRA are options of the layer itself)
    adalora     14        AdaLoRA: per-layer ranks pruned by importance, as PEFT's AdaLoraModel
    bench       12-14     the measured memory and speed suite; bench.quality, the 4-bit against 16-bit study;
                          bench.adalora_study; bench.unsloth, ours beside Unsloth and PEFT
    fsdp        12        FSDP2 sharding of 4-bit models (torchrun entry point)
    doctor      -         versions, device, and whether 4-bit works here
    __main__    -         ``python -m qlora_tutorial doctor``

matmul4bit is taught in chapter 11, but the layer of chapter 6 runs it on every forward pass: it sits
above the layer. The book's and CI's tooling is not part of the package: it lives in ``tools/`` of
the repository.

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

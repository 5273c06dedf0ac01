"""Merging: fold what an adapter learned into the base weights, and measure what that costs.

``merge(model)`` replaces every LoRA layer by a plain ``nn.Linear`` holding ``W0 + s * (W_a @ W_b)^T``
(exact up to the rounding of the dtype it is stored in), or with ``requantize=True`` by a base
quantized again, with no adapter. ``merge_errors`` measures how far each way of storing the merged
weight lands from the weight the adapted layer really computes with.
"""
from __future__ import annotations

import math

import bitsandbytes.functional as bnbF
import torch
from torch import nn

from ..layer import Base8bit, Qlora_4_bit
from ..matmul4bit import dequantize
from ..nf4 import as_state, unpack_4bit
from ..quantize import guard_save_pretrained, unchanged_on_error
from .ours import lora_layers


def _parent(model: nn.Module, name: str):
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def merged_linear(layer: Qlora_4_bit, dtype: torch.dtype | None = None) -> nn.Linear:
    """A frozen ``nn.Linear`` holding the layer's effective weight ``W0 + s * (W_a @ W_b)^T`` (and its bias).

    The sum is formed in float32 and stored in ``dtype`` (default: the base's original dtype).
    """
    dtype = dtype or layer.quant_nn.source_dtype
    weight = layer.merged_weight()
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                       device=weight.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.to(dtype))
        if layer.bias is not None:
            linear.bias.copy_(layer.bias.detach().to(dtype))
    linear.requires_grad_(False)
    return linear.train(layer.training)


def merge(model: nn.Module, requantize: bool = False, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold every LoRA layer's update into its base and drop the adapter; return the model.

    * ``requantize=False``: each layer becomes a plain ``nn.Linear`` with ``W0 + s * (W_a @ W_b)^T`` in
      ``dtype`` (default: the base's original dtype). Exact up to the rounding of that dtype; a
      QLoRA base contributes its dequantized NF4 weight, the one it trained against.
    * ``requantize=True``: the merged weight is quantized to 4 bits again (a ``Qlora_4_bit`` with
      ``require_lora=False``, same quant type and blocksize): a 4-bit model with no adapter, at the
      price of a new rounding error that ``merge_errors`` measures.
    """
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    layers = lora_layers(model)
    # Build every merged layer first (this is where anything can fail), then swap them all in.
    merged = {}
    for name, layer in layers.items():
        linear = merged_linear(layer, dtype)
        if requantize:
            # the same kind of base (a LoRA layer's dense base gets the default, NF4)
            merged[name] = Qlora_4_bit.from_linear(linear, layer.alpha, layer.r, require_lora=False, use_qlora=True,
                                                   name=name, **layer.quant_nn.settings()).train(layer.training)
        else:
            merged[name] = linear
    with unchanged_on_error(model):
        for name, new in merged.items():
            parent, attr = _parent(model, name)
            setattr(parent, attr, new)
        guard_save_pretrained(model)  # a model of plain layers can be saved with save_pretrained again
    return model


@torch.no_grad()
def merge_errors(model: nn.Module, dtypes=(torch.float16, torch.bfloat16)) -> list[dict]:
    """How far each way of merging lands from the weight the adapted layer really computes with.

    For every LoRA layer: ``delta`` = ||s (W_a W_b)^T||_F (the adapter's update), and for each way of
    storing the merged weight W = W0 + update (each dtype in ``dtypes``, and quantized again: "int8" for
    an 8-bit base, else "nf4" or "fp4", the layer's quant type and blocksize, or NF4 for a dense
    base) the Frobenius norm and max abs of the error, and the error
    relative to the update (1.0 = an error as large as everything the adapter changed). For a QLoRA
    layer also ``codes_changed``: the share of its 4-bit codes that requantizing would change.
    """
    rows = []
    for name, layer in lora_layers(model).items():
        exact = layer.merged_weight()
        delta = layer.delta_weight().norm().item()
        row = {"layer": name, "delta": delta}
        stored = {str(d).replace("torch.", ""): exact.to(d).float() for d in dtypes}
        settings = layer.quant_nn.settings()
        quant_type = settings.get("quant_type", "nf4")
        if quant_type == "int8":  # what merge(requantize=True) stores for an 8-bit base
            holder = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
            holder.weight = nn.Parameter(exact, requires_grad=False)
            stored["int8"] = Base8bit.quantize(holder).dense_weight().float()
        else:
            packed, state = bnbF.quantize_4bit(exact.contiguous(), blocksize=settings.get("blocksize", 64),
                                               quant_type=quant_type)
            stored[quant_type] = dequantize(packed, as_state(state)).float()
        if layer.is_quantized:
            # Which 4-bit codes the requantized weight changes (two codes per byte: high, low nibble).
            ours = layer.quant_nn.packed()
            row["codes_changed"] = (unpack_4bit(packed, 2 * packed.numel()) != unpack_4bit(ours, 2 * ours.numel())
                                    ).float().mean().item()
        for key, approx in stored.items():
            err = approx - exact
            row[f"{key}_error"] = err.norm().item()
            row[f"{key}_max_abs"] = err.abs().max().item()
            row[f"{key}_relative_to_delta"] = err.norm().item() / delta if delta > 0 else math.inf
        rows.append(row)
    return rows

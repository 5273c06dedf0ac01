"""Three variants from the original README's wish list, on top of ``Qlora_4_bit``.

* **An 8-bit base** (LLM.int8, Dettmers et al. 2022): ``quant_type="int8"`` stores each weight row
  as int8 codes with one float32 scale per row, in bitsandbytes' ``Linear8bitLt``: the weight is
  rounded to float16, and code = round(w * 127 / absmax of its row).
  Its forward quantizes the input row-wise too, except the feature columns holding an outlier above
  ``threshold`` (6.0), which it multiplies in 16 bits: the "mixed-precision decomposition".
* **DoRA** (Liu et al. 2024): split the adapted weight into a direction and a length per output row,

      W' = m * (W0 + s * dW) / ||W0 + s * dW||_row,      dW = (W_a @ W_b)^T,

  and train the length ``m`` (one number per output feature, initialised to ||W0||_row) beside
  W_a and W_b. As the paper suggests (section 4.3) and PEFT does, the norm is treated as a constant
  in backward, so no gradient flows through it.
* **LoRA+** (Hayou et al. 2024): the same layer, trained with a larger learning rate for W_b than for
  W_a (ratio 16 by default): ``loraplus_param_groups``.

Each one is checked against PEFT's implementation (``use_dora=True``; ``create_loraplus_optimizer``)
in the package tests; ``layer.py`` and ``quantize.py`` use the pieces below.
"""
from __future__ import annotations

import bitsandbytes as bnb
import torch
from torch import nn

from .lora import delta_weight

INT8_THRESHOLD = 6.0  # LLM.int8's outlier threshold (bitsandbytes' and transformers' default)


# ---------------------------------------------------------------- 8-bit base
def make_int8_base(linear: nn.Linear, threshold: float = INT8_THRESHOLD) -> "bnb.nn.Linear8bitLt":
    """A frozen ``bnb.nn.Linear8bitLt`` holding ``linear``'s weight as int8 rows (quantized now).

    ``has_fp16_weights=False`` keeps only the int8 codes and the row scales: the inference (and
    LoRA) layout, one byte per weight.
    """
    weight = linear.weight
    base = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                               has_fp16_weights=False, threshold=threshold, device="meta")
    base.weight = bnb.nn.Int8Params(weight.detach().clone(), requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        base.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    if weight.device.type != "meta":
        base.to(weight.device)  # bitsandbytes quantizes an Int8Params when it is moved to a device
    return base


def is_int8_base(module: nn.Module) -> bool:
    return isinstance(module, bnb.nn.Linear8bitLt)


def int8_row_scales(base: "bnb.nn.Linear8bitLt") -> torch.Tensor:
    """The float32 scale of each weight row (its absmax): kept on the weight until the first
    forward, then on the layer's matmul state."""
    scales = getattr(base.weight, "SCB", None)
    if scales is None:
        scales = base.state.SCB
    if scales is None:
        raise ValueError("this Linear8bitLt holds no row scales (SCB): it was never quantized")
    return scales


def int8_weight(base: "bnb.nn.Linear8bitLt") -> torch.Tensor:
    """The dense float32 (out, in) weight an 8-bit base stands for: codes * absmax / 127, row by row."""
    return base.weight.data.float() * (int8_row_scales(base).float() / 127).unsqueeze(1)


# ---------------------------------------------------------------- DoRA
def dora_magnitude(weight: torch.Tensor) -> torch.Tensor:
    """DoRA's initial magnitude: the L2 norm of each output row of the (out, in) weight, float32."""
    return torch.linalg.norm(weight.float(), dim=1)


def dora_factor(magnitude: torch.Tensor, base_weight: torch.Tensor, W_a: torch.Tensor, W_b: torch.Tensor,
                scale: float) -> torch.Tensor:
    """m / ||W0 + s * dW||_row, one number per output feature; the norm is detached (no gradient).

    Computed in the base weight's dtype, as PEFT does (its ``DoraLinearLayer`` casts both weights
    to the input's dtype first).
    """
    with torch.no_grad():
        update = delta_weight(W_a.detach().to(base_weight.dtype), W_b.detach().to(base_weight.dtype), scale)
        norm = torch.linalg.norm(base_weight + update, dim=1)
    return magnitude / norm


def dora_output(base_out: torch.Tensor, bias: torch.Tensor | None, lora_out: torch.Tensor,
                factor: torch.Tensor) -> torch.Tensor:
    """DoRA's layer output from the plain base output (bias included) and the LoRA branch's s * x A B:

        factor * (W0 x + s * x A B) + bias  =  base_out + (factor - 1) * (base_out - bias) + factor * lora_out

    (the second form reuses the base's output instead of a second matmul with W0, as PEFT does).
    """
    without_bias = base_out if bias is None else base_out - bias.to(base_out.dtype)
    return base_out + (factor - 1) * without_bias + factor * lora_out


def dora_merged_weight(base_weight: torch.Tensor, W_a: torch.Tensor, W_b: torch.Tensor, scale: float,
                       magnitude: torch.Tensor) -> torch.Tensor:
    """The (out, in) weight a DoRA layer computes with, in float32: m * (W0 + s dW) / ||W0 + s dW||_row."""
    W = base_weight.float() + delta_weight(W_a.detach().float(), W_b.detach().float(), scale)
    return (magnitude.detach().float() / torch.linalg.norm(W, dim=1)).unsqueeze(1) * W


# ---------------------------------------------------------------- LoRA+
LORAPLUS_RATIO = 16.0  # the LoRA+ paper's recommended lr_B / lr_A for language models


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float = LORAPLUS_RATIO,
                          weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups for LoRA+: W_a at ``lr``, W_b at ``lr * ratio``.

    The grouping follows PEFT's ``create_loraplus_optimizer``: every other trainable vector (DoRA's
    magnitude, a trained bias) goes with B, at ``lr * ratio`` and without weight decay; any other
    trainable matrix goes with A. Frozen parameters are left out.
    """
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if not (isinstance(ratio, (int, float)) and ratio >= 1):
        raise ValueError(f"LoRA+ ratio (lr_B / lr_A) must be a number >= 1, got {ratio!r}; "
                         "the LoRA+ paper recommends 16")
    groups = {"A": [], "B": [], "B_no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("W_b"):
            groups["B"].append(p)
        elif p.ndim == 1:
            groups["B_no_decay"].append(p)
        else:
            groups["A"].append(p)
    if not groups["B"]:
        raise ValueError("the model has no trainable W_b: wrap it with quantize_model(..., require_lora=True) first")
    return [{"params": groups["A"], "lr": lr, "weight_decay": weight_decay},
            {"params": groups["B"], "lr": lr * ratio, "weight_decay": weight_decay},
            {"params": groups["B_no_decay"], "lr": lr * ratio, "weight_decay": 0.0}]

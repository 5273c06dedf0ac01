"""LoRA+ (Hayou et al. 2024), and where the book's other variants live.

LoRA+ trains the same layer with a larger learning rate for W_b than for W_a (ratio 16 by
default): ``loraplus_param_groups`` makes the optimizer's parameter groups, and
``loraplus_optimizer`` the optimizer a ``Trainer`` takes (``make_trainer(..., optimizers=...)``).
The grouping follows PEFT's ``create_loraplus_optimizer``; the package tests check it against PEFT.

The other variants of the original README's wish list are options of the layer itself, because the
layer builds them: an 8-bit LLM.int8 base is ``Qlora_4_bit(..., quant_type="int8")`` (the base class
``layer.Base8bit``), and DoRA is ``Qlora_4_bit(..., use_dora=True)`` (its math in ``lora``: ``dora_*``).
"""
from __future__ import annotations

import math

from torch import nn

LORAPLUS_RATIO = 16.0  # the LoRA+ paper's recommended lr_B / lr_A for language models


def _positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float = LORAPLUS_RATIO,
                          weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups for LoRA+: W_a at ``lr``, W_b at ``lr * ratio``.

    The grouping follows PEFT's ``create_loraplus_optimizer``: every other trainable vector (DoRA's
    magnitude, a trained bias) goes with B, at ``lr * ratio`` and without weight decay; any other
    trainable matrix goes with A. Frozen parameters are left out.
    """
    if not _positive_finite(lr):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if not (_positive_finite(ratio) and ratio >= 1):
        raise ValueError(f"LoRA+ ratio (lr_B / lr_A) must be a finite number >= 1, got {ratio!r}; "
                         "the LoRA+ paper recommends 16")
    if not (isinstance(weight_decay, (int, float)) and not isinstance(weight_decay, bool) and math.isfinite(weight_decay)
            and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
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


def loraplus_optimizer(model: nn.Module, args, ratio: float = LORAPLUS_RATIO):
    """``(optimizer, None)`` for a ``Trainer``'s ``optimizers``: the optimizer ``args`` asks for (AdamW,
    or paged AdamW on a GPU), on LoRA+'s groups, W_b at ``ratio`` times W_a's learning rate."""
    from transformers import Trainer

    # The optimizer class and settings the Trainer would pick for args.optim, on LoRA+'s groups.
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    kwargs.pop("lr", None)
    groups = loraplus_param_groups(model, args.learning_rate, ratio, args.weight_decay)
    return cls(groups, lr=args.learning_rate, **kwargs), None

"""How much a change to the weights costs in quality: perplexity on a held-out text.

Perplexity is exp of the mean next-token negative log-likelihood,

    PPL = exp( -1/N * sum_t log p(x_t | x_<t) ),

so a model that spreads its bets evenly over k tokens scores k. We use it to compare the same
model before and after quantizing its weights (and later, before and after fine-tuning).

The default text (``heldout_text()``) is a short story of about 375 words written for this book and
shipped in the package, so no model could have seen it during pretraining.
"""
from __future__ import annotations

import math
from importlib import resources

import torch
from torch import nn


def heldout_text() -> str:
    """The package's held-out evaluation text (about 375 words of plain English prose)."""
    return resources.files("qlora_tutorial").joinpath("data_files/heldout.txt").read_text(encoding="utf-8")


@torch.no_grad()
def perplexity(model, tokenizer, text: str | None = None, max_length: int = 512) -> float:
    """Perplexity of a causal LM on ``text`` (default: ``heldout_text()``).

    The text is cut into consecutive windows of at most ``max_length`` tokens; every token after
    the first of its window is predicted once, and the mean negative log-likelihood is taken over
    all of them. The model is put in eval mode and left there.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (one token to condition on, one to predict), got {max_length}")
    text = heldout_text() if text is None else text
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() < 2:
        raise ValueError("the text is shorter than two tokens; perplexity needs at least one prediction")
    device = next(model.parameters()).device
    model.eval()
    nll_sum, count = 0.0, 0
    for start in range(0, ids.numel() - 1, max_length):
        window = ids[start:start + max_length].unsqueeze(0).to(device)
        if window.shape[1] < 2:
            break
        logits = model(window).logits.float()
        nll = nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum")
        nll_sum += nll.item()
        count += window.shape[1] - 1
    return math.exp(nll_sum / count)


@torch.no_grad()
def fake_quantize_linears(model: nn.Module, targets, quant_type: str = "int4", blocksize: int = 64,
                          double_quant: bool = False) -> nn.Module:
    """Replace, in place, the weight of every targeted ``nn.Linear`` by its quantize-dequantize round trip.

    The layers stay dense ``nn.Linear`` layers; only their values change, to the ones a 4-bit
    format (``quant_type``: "nf4", "fp4", "int4", see ``nf4.fake_quantize``) can represent. Used for
    formats bitsandbytes has no layer for (INT4), and to measure quality without bitsandbytes.
    Returns ``model``.
    """
    from .lora import lora_targets
    from .nf4 import fake_quantize

    for _, module in lora_targets(model, targets):  # every target must match a layer
        w = module.weight
        round_trip = fake_quantize(w.data, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
        module.weight.copy_(round_trip.to(w.dtype))
    return model

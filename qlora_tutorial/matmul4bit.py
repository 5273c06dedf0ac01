"""The 4-bit matmul as a hand-written ``torch.autograd.Function``: what bitsandbytes' ``MatMul4Bit`` does.

    forward:   W = dequantize(packed, state)        (out, in), in the input's dtype, a temporary
               y = x @ W^T + bias
    backward:  dL/dx = dL/dy @ W                     W dequantized again from the packed bytes
               dL/dW: none (the base is frozen), dL/dbias = dL/dy summed over tokens (if it trains)

What it keeps for the backward pass is the point: the packed uint8 weight and its quantization
state, never the dense W (that would cost as much memory as the 16-bit model QLoRA avoids), and not
x either (x is only needed for dL/dW, which a frozen base never computes). The LoRA branch next to
it saves x for its own gradients; see ``saved_tensors``.

The dequantization is the book's own (``qlora_tutorial.nf4.dequantize_nf4``), read from the same
bytes and state bitsandbytes uses; the tests check outputs and gradients against ``bnb.matmul_4bit``.
"""
from __future__ import annotations

import torch

from .nf4 import State4bit, dequantize_nf4


def _state(quant_state) -> State4bit:
    """Ours from either a ``State4bit`` or a bitsandbytes ``QuantState``."""
    if isinstance(quant_state, State4bit):
        return quant_state
    if quant_state is None or not hasattr(quant_state, "absmax"):
        raise TypeError("quant_state must be a qlora_tutorial.nf4.State4bit or a bitsandbytes QuantState "
                        f"(e.g. layer.weight.quant_state), got {type(quant_state).__name__}")
    return State4bit.from_bnb(quant_state)


class MatMul4bit(torch.autograd.Function):
    """y = x @ dequantize(packed)^T + bias, saving only the packed bytes for backward."""

    @staticmethod
    def forward(ctx, x, packed, quant_state, bias=None):
        state = _state(quant_state)
        if len(state.shape) != 2 or x.shape[-1] != state.shape[1]:
            raise ValueError(f"x has {x.shape[-1]} features but the 4-bit weight is {tuple(state.shape)} (out, in)")
        W = dequantize_nf4(packed, state).to(x.dtype)  # lives only until this function returns
        ctx.state = state
        ctx.has_bias = bias is not None
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(packed)  # uint8, half a byte per weight; no dense W, no x
        return torch.nn.functional.linear(x, W, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            (packed,) = ctx.saved_tensors
            W = dequantize_nf4(packed, ctx.state).to(grad_out.dtype)  # dequantized a second time
            grad_x = grad_out @ W
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, quant_state, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for a 4-bit weight given as packed bytes and its state (ours or bitsandbytes')."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be the uint8 tensor of a 4-bit weight, got {packed.dtype}; "
                        "pass layer.weight.data of a quantized bitsandbytes Linear4bit")
    return MatMul4bit.apply(x, packed, quant_state, bias)


def saved_tensors(fn, *args) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of every tensor autograd keeps for backward while ``fn(*args)`` runs."""
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return saved

"""The 4-bit matmul as one ``torch.autograd.Function``: the path every 4-bit layer of the book takes.

    forward:   W = dequantize(packed, state)        (out, in), in the input's dtype, a temporary
               y = x @ W^T + bias
    backward:  dL/dx = dL/dy @ W                     W dequantized again from the packed bytes
               dL/dW: none (the base is frozen), dL/dbias = dL/dy summed over tokens (if it trains)

What it keeps for the backward pass is the point: the packed uint8 weight (``save_for_backward``)
and its quantization state (``ctx.state``: block scales and code), never the dense W (that would cost
as much memory as the 16-bit model QLoRA avoids), and not x either (x is only needed for dL/dW,
which a frozen base never computes). The LoRA branch next to it saves x for its own gradients; see
``saved_tensors``. ``Qlora_4_bit`` calls this Function on every device, eager, compiled, and
recorded as a CUDA graph, and the tests check its outputs and gradients against bitsandbytes'
``MatMul4Bit``.

How the packed weight becomes a dense matrix is a *backend*, picked in one place (``pick_backend``);
they all give the same bits:

* ``"reference"``: the book's own ``nf4.dequantize_nf4``, a few readable tensor operations;
* ``"bitsandbytes"``: its ``dequantize_4bit`` kernel. On the CPU, bitsandbytes 0.50 reads the wrong
  block scales when a row (``in_features`` values) is not a whole number of blocks; the reference
  does those weights;
* ``"triton"``: the NF4 kernel of ``qlora_tutorial.nf4_triton``, for NF4 weights on CUDA. Importing
  that module (``qlora_tutorial.fast`` does) adds it with ``register_backend``.

Under ``torch.compile`` the dequantization is one custom operator, opaque to the compiler. Written
as plain tensor operations, the compiler would see the same dequantization in the forward and in
the backward, compute it once, and keep the dense weight alive between the two; the backward calls
a second operator with the same body (``dequantize_again``), which the compiler cannot merge with
the first.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .nf4 import State4bit, as_state, dequantize_nf4


# ------------------------------------------------------------------ backends
@dataclass(frozen=True)
class Backend:
    """One way to dequantize a packed 4-bit weight: ``dequantize(packed, state, dtype)``, used for
    the weights for which ``handles(packed, state)`` is true."""

    name: str
    dequantize: Callable[[torch.Tensor, State4bit, torch.dtype], torch.Tensor]
    handles: Callable[[torch.Tensor, State4bit], bool]


def _bitsandbytes_handles(packed: torch.Tensor, state: State4bit) -> bool:
    # bitsandbytes 0.50's CPU kernel looks up the block scales per row, while the quantizer lays the
    # blocks out over the flattened weight: the two agree only when a row is a whole number of blocks.
    return not (packed.device.type == "cpu" and state.shape[-1] % state.blocksize)


def _bitsandbytes_dequantize(packed: torch.Tensor, state: State4bit, dtype: torch.dtype) -> torch.Tensor:
    import bitsandbytes.functional as bnbF

    bnb_state = state.to_bnb()
    bnb_state.dtype = dtype  # the dtype bitsandbytes writes the weight in
    weight = bnbF.dequantize_4bit(packed.reshape(-1, 1), bnb_state)
    # a compatibility rule of bitsandbytes for an old layout transposes the result of a single packed byte
    return weight.t() if packed.numel() == 1 else weight


REFERENCE = Backend("reference", dequantize_nf4, lambda packed, state: True)
BITSANDBYTES = Backend("bitsandbytes", _bitsandbytes_dequantize, _bitsandbytes_handles)
# In order of preference; the reference handles every weight, so it comes last.
BACKENDS: list[Backend] = [BITSANDBYTES, REFERENCE]
_forced: Optional[Backend] = None


def register_backend(backend: Backend) -> None:
    """Add a backend, preferred to those registered before it (registering a name again replaces it)."""
    BACKENDS[:] = [backend] + [b for b in BACKENDS if b.name != backend.name]


def pick_backend(packed: torch.Tensor, state: State4bit) -> Backend:
    """The backend that dequantizes this weight: the first in ``BACKENDS`` that handles it (or the one
    ``use_backend`` asks for, which must handle it)."""
    if _forced is not None:
        if not _forced.handles(packed, state):
            raise ValueError(f"the 4-bit backend {_forced.name!r} (use_backend) cannot dequantize this weight "
                             f"({state.quant_type}, {tuple(state.shape)}, on {packed.device.type}); pick one whose "
                             f"handles() accepts it, or leave the choice to pick_backend")
        return _forced
    return next(b for b in BACKENDS if b.handles(packed, state))


@contextlib.contextmanager
def use_backend(name: str):
    """Within the block, dequantize every 4-bit weight with the backend ``name`` (to compare them)."""
    global _forced
    found = [b for b in BACKENDS if b.name == name]
    if not found:
        raise ValueError(f"no 4-bit backend named {name!r}; the registered ones are {[b.name for b in BACKENDS]}")
    previous, _forced = _forced, found[0]
    try:
        yield found[0]
    finally:
        _forced = previous


# ------------------------------------------------------------------ dequantization, eager and compiled
def _dequantize_op(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, offset: Optional[torch.Tensor],
                   absmax2: Optional[torch.Tensor], code2: Optional[torch.Tensor], blocksize: int, blocksize2: int,
                   rows: int, cols: int, quant_type: str, dtype: torch.dtype) -> torch.Tensor:
    state = State4bit(absmax=absmax, shape=torch.Size((rows, cols)), dtype=dtype, blocksize=blocksize,
                      quant_type=quant_type, code=code, offset=offset, absmax2=absmax2, code2=code2,
                      blocksize2=blocksize2)
    return pick_backend(packed, state).dequantize(packed, state, dtype)


def _fake(packed, absmax, code, offset, absmax2, code2, blocksize, blocksize2, rows, cols, quant_type, dtype):
    return packed.new_empty((rows, cols), dtype=dtype)


dequantize_op = torch.library.custom_op("qlora_tutorial::dequantize_4bit", mutates_args=())(_dequantize_op)
dequantize_again = torch.library.custom_op("qlora_tutorial::dequantize_4bit_again", mutates_args=())(_dequantize_op)
dequantize_op.register_fake(_fake)
dequantize_again.register_fake(_fake)


def dequantize(packed: torch.Tensor, state: State4bit, dtype: Optional[torch.dtype] = None, *,
               backward: bool = False, operator: Optional[bool] = None) -> torch.Tensor:
    """The dense weight of a packed 4-bit weight, in ``dtype`` (default: the dtype it was quantized from).

    Eager: the backend ``pick_backend`` picks, called directly (an operator's dispatch costs tens of
    microseconds, more than a GPU kernel takes for most layers). Under ``torch.compile`` (or with
    ``operator=True``): the custom operator, ``dequantize_again`` in the backward.
    """
    if len(state.shape) != 2:
        raise ValueError(f"a 4-bit matmul needs a 2-D (out, in) weight, this state is shaped {tuple(state.shape)}")
    dtype = dtype or state.dtype
    use_operator = torch.compiler.is_compiling() if operator is None else operator
    if use_operator:
        op = dequantize_again if backward else dequantize_op
        return op(packed, state.absmax, state.code, state.offset, state.absmax2, state.code2, state.blocksize,
                  state.blocksize2, state.shape[0], state.shape[1], state.quant_type, dtype)
    return pick_backend(packed, state).dequantize(packed, state, dtype)


# ------------------------------------------------------------------ the Function
class MatMul4bit(torch.autograd.Function):
    """y = x @ dequantize(packed)^T + bias, saving only the packed bytes (and the state) for backward."""

    @staticmethod
    def forward(ctx, x, packed, state, bias=None):
        W = dequantize(packed, state, x.dtype)  # lives only until this function returns
        ctx.state = state
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(packed)  # uint8, half a byte per weight; no dense W, no x
        return torch.nn.functional.linear(x, W, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            (packed,) = ctx.saved_tensors
            W = dequantize(packed, ctx.state, grad_out.dtype, backward=True)  # dequantized a second time
            grad_x = grad_out @ W
        if ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, quant_state, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for a 4-bit weight given as packed bytes and its state (ours or bitsandbytes')."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be the uint8 tensor of a 4-bit weight, got {packed.dtype}; "
                        "pass layer.weight.data of a quantized bitsandbytes Linear4bit")
    state = as_state(quant_state)
    if len(state.shape) != 2 or x.shape[-1] != state.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features but the 4-bit weight is {tuple(state.shape)} (out, in)")
    return MatMul4bit.apply(x, packed, state, bias)


def saved_tensors(fn, *args) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of every tensor autograd keeps for backward while ``fn(*args)`` runs."""
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return saved

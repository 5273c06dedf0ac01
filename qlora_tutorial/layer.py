"""``Qlora_4_bit``: one linear layer = a frozen base plus an optional trainable low-rank update.

    y = base(x) + s * (x @ W_a) @ W_b          W_a: (in, r),  W_b: (r, out),  s = alpha / r

Three modes, picked with the seed's two switches:

* QLoRA (``use_qlora=True, require_lora=True``): the base is a ``bitsandbytes.nn.Linear4bit`` holding
  the weight as NF4 (blockwise 4-bit, blocksize 64), dequantized on the fly in every forward.
* LoRA (``use_qlora=False, require_lora=True``): the base is the original ``nn.Linear``, frozen, in
  its own dtype.
* Quantization only (``use_qlora=True, require_lora=False``): the 4-bit base alone, for inference.

The LoRA math itself (scale, init, the low-rank branch, the (out, in) update) lives in
``qlora_tutorial.lora``; this module only assembles it around a base layer.
"""
from __future__ import annotations

import copy

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import torch
from torch import nn

from .fast import base_forward
from .lora import check_rank_alpha, delta_weight, init_lora_, lora_forward, lora_scale

# Layers that bitsandbytes (or transformers' BitsAndBytesConfig) has already quantized.
QUANTIZED_LINEAR_TYPES = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def default_compute_dtype() -> torch.dtype:
    """The dtype 4-bit layers compute in when none is given: the device helper's choice.

    float32 on a CPU, bfloat16 on a GPU that supports it, else float16 (see ``device.pick_device``).
    """
    from .device import pick_device

    return pick_device().dtype


def check_plain_linear(linear, name: str = "layer") -> None:
    """Raise a clear error unless ``linear`` is an ordinary (not yet quantized) ``nn.Linear``."""
    if isinstance(linear, Qlora_4_bit):
        raise ValueError(f"{name} is already a Qlora_4_bit; wrap each nn.Linear once")
    if isinstance(linear, QUANTIZED_LINEAR_TYPES):
        raise ValueError(
            f"{name} is a {type(linear).__module__}.{type(linear).__name__}: it is already quantized "
            "(e.g. loaded with transformers' BitsAndBytesConfig). Load the model without a "
            "quantization_config and let Qlora_4_bit quantize it, or use PEFT on the quantized model."
        )
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"{name} must be a torch.nn.Linear, got {type(linear).__name__}")


class Qlora_4_bit(nn.Module):
    """A frozen base linear layer (4-bit or not) plus the LoRA matrices ``W_a`` and ``W_b``.

    Build it from an existing layer with ``Qlora_4_bit.from_linear(linear, alpha, r, ...)`` (the
    weights are carried over exactly, bias included), or from sizes with
    ``Qlora_4_bit(in_features, out_features, alpha, r, ...)`` (a freshly initialised base).

    Attributes kept from the seed: ``quant_nn`` (the base layer), ``W_a`` (in x r), ``W_b``
    (r x out), ``scale`` (alpha / r, or alpha / sqrt(r) with ``rslora=True``), ``require_lora``,
    ``use_qlora``.
    """

    def __init__(self, in_features: int, out_features: int, alpha: float, r: int,
                 require_lora: bool = True, use_qlora: bool = True, *, bias: bool = True,
                 rslora: bool = False, compress_statistics: bool = True,
                 compute_dtype: torch.dtype | None = None, quant_type: str = "nf4",
                 blocksize: int = 64, device=None, dtype: torch.dtype | None = None,
                 linear: nn.Linear | None = None):
        super().__init__()
        check_rank_alpha(r, alpha)
        if linear is None:
            linear = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        check_plain_linear(linear, "linear")
        if (linear.in_features, linear.out_features) != (in_features, out_features):
            raise ValueError(f"linear is {linear.in_features} -> {linear.out_features}, "
                             f"but in_features={in_features}, out_features={out_features} were given")
        if quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
        weight = linear.weight
        if weight.device.type != "meta" and not torch.isfinite(weight).all():
            raise ValueError("the weight of the layer to wrap has NaN or inf entries; "
                             "quantizing them would spread them over a whole block of 64 weights")

        self.in_features, self.out_features = in_features, out_features
        self.alpha, self.r, self.rslora = alpha, r, rslora
        self.require_lora, self.use_qlora = bool(require_lora), bool(use_qlora)
        self.scale = lora_scale(alpha, r, rslora)

        if self.use_qlora:
            self.quant_nn = self._make_4bit(linear, compute_dtype or default_compute_dtype(),
                                            compress_statistics, quant_type, blocksize)
        else:
            # LoRA mode: the base *is* the given layer (no copy, its own dtype), frozen.
            self.quant_nn = linear
        self.quantize_weight()

        if self.require_lora:
            # Adapters are float32 "master" weights on the base's device; forward casts them to x.dtype.
            self.W_a = nn.Parameter(torch.empty(in_features, r, device=weight.device, dtype=torch.float32))
            self.W_b = nn.Parameter(torch.empty(r, out_features, device=weight.device, dtype=torch.float32))
            init_lora_(self.W_a, self.W_b)
        else:
            self.W_a = None
            self.W_b = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, alpha: float, r: int, require_lora: bool = True,
                    use_qlora: bool = True, **kwargs) -> "Qlora_4_bit":
        """Wrap an existing ``nn.Linear``: its weight (quantized or as is) and its bias carry over."""
        check_plain_linear(linear, "linear")
        return cls(linear.in_features, linear.out_features, alpha, r, require_lora, use_qlora,
                   bias=linear.bias is not None, linear=linear, **kwargs)

    @staticmethod
    def _make_4bit(linear: nn.Linear, compute_dtype, compress_statistics, quant_type, blocksize):
        """A ``bnb.nn.Linear4bit`` holding ``linear``'s weight, quantized now (unless on ``meta``)."""
        weight = linear.weight
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=compress_statistics,
                              quant_type=quant_type, device="meta")
        q.weight = bnb.nn.Params4bit(weight.detach(), requires_grad=False, blocksize=blocksize,
                                     compress_statistics=compress_statistics, quant_type=quant_type,
                                     module=q)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        # bitsandbytes quantizes a Params4bit the first time it is moved to a (non-meta) device,
        # and only then; moving it to the device it is already on is how we ask for it now.
        if weight.device.type != "meta":
            q.to(weight.device)
        # On CPUs with AVX512-BF16, Linear4bit's eval-mode forward repacks the weight into a
        # CPU-only layout and rounds the block scales to bfloat16, so the same layer would give
        # different outputs in train and eval mode. We keep bitsandbytes' standard layout instead.
        q.support_avx512bf16_for_cpu = False
        return q

    # ------------------------------------------------------------------ state
    def quantize_weight(self) -> None:
        """Freeze the base layer (weight and bias): only ``W_a`` and ``W_b`` ever train."""
        for p in self.quant_nn.parameters():
            p.requires_grad_(False)

    @property
    def weight(self):
        """The base layer's weight parameter (packed uint8 in 4-bit mode), for code that reads ``.weight``."""
        return self.quant_nn.weight

    @property
    def bias(self):
        return self.quant_nn.bias

    @property
    def is_quantized(self) -> bool:
        return isinstance(self.quant_nn, bnb.nn.Linear4bit) and bool(getattr(self.quant_nn.weight, "bnb_quantized", False))

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_qlora and x.device.type == "cpu" and self.in_features % self.quant_nn.weight.blocksize:
            # Measured on bitsandbytes 0.50.2: its CPU kernel looks up block scales per row, so rows
            # whose length is not a multiple of the blocksize dequantize with wrong scales.
            raise ValueError(
                f"in_features={self.in_features} is not a multiple of the 4-bit blocksize "
                f"{self.quant_nn.weight.blocksize}: bitsandbytes' CPU 4-bit kernel dequantizes such "
                "layers with the wrong block scales. Run this layer on CUDA, or use use_qlora=False.")
        out = base_forward(self.quant_nn, x)  # our NF4 kernel on CUDA / under torch.compile (fast.py)
        if self.require_lora:
            out = out + lora_forward(x, self.W_a, self.W_b, self.scale)
        return out

    # ------------------------------------------------------------------ dense views (for merging)
    def base_weight(self) -> torch.Tensor:
        """The base's dense (out, in) weight: dequantized in 4-bit mode, else the weight itself.

        In 4-bit mode this is exactly the matrix the forward multiplies with (up to compute dtype),
        returned in the dtype the original weight had.
        """
        if not self.use_qlora:
            return self.quant_nn.weight.detach()
        w = self.quant_nn.weight
        if not getattr(w, "bnb_quantized", False):  # on meta: nothing was quantized yet
            return w.detach()
        data, state = w.data, w.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # a layer repacked by bnb's CPU path
            state = copy.deepcopy(state)
            data, state = bnbF._convert_weight_packed_for_cpu_inverse(data.clone(), state)
        return bnbF.dequantize_4bit(data, state)

    def delta_weight(self) -> torch.Tensor:
        """The LoRA update to the (out, in) weight, s * (W_a @ W_b)^T, in float32 (zeros without LoRA)."""
        if not self.require_lora:
            return torch.zeros(self.out_features, self.in_features, device=self.quant_nn.weight.device)
        return delta_weight(self.W_a.detach().float(), self.W_b.detach().float(), self.scale)

    def merged_weight(self) -> torch.Tensor:
        """The effective dense (out, in) weight in float32: base_weight() + delta_weight()."""
        return self.base_weight().float() + self.delta_weight()

    def extra_repr(self) -> str:
        mode = ("QLoRA" if self.require_lora else "4-bit only") if self.use_qlora else (
            "LoRA" if self.require_lora else "frozen base only")
        return (f"in_features={self.in_features}, out_features={self.out_features}, mode={mode}, "
                f"r={self.r}, alpha={self.alpha}, scale={self.scale:g}")

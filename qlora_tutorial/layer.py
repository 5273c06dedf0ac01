"""``Qlora_4_bit``: one linear layer = a frozen base plus an optional trainable low-rank update.

    y = base(x) + s * (x @ W_a) @ W_b          W_a: (in, r),  W_b: (r, out),  s = alpha / r

Three modes, picked with the original README's two switches:

* QLoRA (``use_qlora=True, require_lora=True``): the base is a ``bitsandbytes.nn.Linear4bit`` holding
  the weight as NF4 (blockwise 4-bit, blocksize 64), dequantized on the fly in every forward.
* LoRA (``use_qlora=False, require_lora=True``): the base is the original ``nn.Linear``, frozen, in
  its own dtype.
* Quantization only (``use_qlora=True, require_lora=False``): the 4-bit base alone, for inference.

Two variants from the original README's wish list (``qlora_tutorial.variants`` holds their math):
``quant_type="int8"`` stores the base in 8 bits (LLM.int8, bitsandbytes' ``Linear8bitLt``) instead
of 4, and ``use_dora=True`` adds DoRA's trainable magnitude ``magnitude`` beside ``W_a``/``W_b``.

The LoRA math itself (scale, init, the low-rank branch, the (out, in) update) lives in
``qlora_tutorial.lora``; this module only assembles it around a base layer.

On the CPU, bitsandbytes 0.50 dequantizes a 4-bit weight with the wrong block scales when a row
(``in_features`` values) is not a whole number of blocks. For such layers the forward, ``base_weight``
and merging use the package's own exact NF4/FP4 dequantizer (``nf4.dequantize_nf4``) instead.

The layer's state dict holds the 4-bit weight as bitsandbytes writes it (packed bytes plus the
quantization state), and ``load_state_dict`` reads all of it back, so a quantized model saved with
``state_dict()`` loads bit-exact into a freshly quantized one.
"""
from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import torch
from torch import nn

from . import lora
from .fast import base_forward
from .lora import check_rank_alpha, init_lora_, lora_forward, lora_scale
from .nf4 import BLOCKSIZES, State4bit, dequantize_nf4
from .variants import (dora_factor, dora_magnitude, dora_merged_weight, dora_output, int8_weight, is_int8_base,
                       make_int8_base)

# What bitsandbytes' 4-bit quantizer takes (float64 and integer weights fail inside it).
QUANTIZABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

QUANT_TYPES = ("nf4", "fp4", "int8")

# Layers that bitsandbytes (or transformers' BitsAndBytesConfig) has already quantized.
QUANTIZED_LINEAR_TYPES = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def default_compute_dtype(device=None) -> torch.dtype:
    """The dtype a 4-bit layer computes in when none is given: the device helper's choice for the
    device its weight lives on.

    float32 on a CPU, bfloat16 on a GPU that supports it, else float16 (see ``device.pick_device``).
    A weight on the ``meta`` device (a model planned before it is placed) gets this machine's choice.
    """
    from .device import pick_device

    kind = torch.device(device).type if device is not None else None
    return pick_device(kind if kind in ("cpu", "cuda") else None).dtype


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


def check_features(in_features, out_features, name: str) -> None:
    """Both sizes must be positive integers: a 0-wide layer would quantize nothing and return garbage."""
    for what, value in (("in_features", in_features), ("out_features", out_features)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: {what} must be a positive integer, got {value!r}")


def check_quant_settings(quant_type, blocksize, name: str) -> None:
    """The base formats bitsandbytes 0.50 supports (on the CPU and on CUDA): NF4 and FP4 with their
    blocksizes, or LLM.int8 ("int8", which has one scale per row and no blocksize)."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"{name}: quant_type must be 'nf4', 'fp4' (4-bit) or 'int8' (LLM.int8), got {quant_type!r}")
    if not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize not in BLOCKSIZES:
        raise ValueError(f"{name}: blocksize must be one of {BLOCKSIZES} (the 4-bit block sizes bitsandbytes "
                         f"supports), got {blocksize!r}; the usual choice is 64")


def check_variant_settings(quant_type, blocksize, compute_dtype, use_dora, require_lora, name: str) -> None:
    """Settings that only some modes use: DoRA needs the LoRA matrices; an 8-bit base has neither a
    blocksize (one scale per row) nor a compute dtype (``Linear8bitLt`` computes in the input's)."""
    if use_dora and not require_lora:
        raise ValueError(f"{name}: use_dora=True needs the LoRA matrices (require_lora=True): DoRA rescales "
                         "W0 + s * dW, and without an adapter there is nothing to train")
    if quant_type == "int8" and (blocksize != 64 or compute_dtype is not None):
        raise ValueError(f"{name}: quant_type='int8' (LLM.int8) has one scale per row and computes in the input's "
                         f"dtype; blocksize={blocksize!r} and compute_dtype={compute_dtype!r} apply to 4-bit bases "
                         "only. Leave them at their defaults")


def check_weight_to_wrap(linear: nn.Linear, name: str, use_qlora: bool) -> None:
    """A weight Qlora_4_bit can hold: floating point, a dtype bitsandbytes quantizes, finite."""
    weight = linear.weight
    if not weight.is_floating_point():
        raise ValueError(f"{name}: the weight is {weight.dtype}, not floating point; load the model in "
                         "float32, float16 or bfloat16")
    if use_qlora and weight.dtype not in QUANTIZABLE_DTYPES:
        raise ValueError(f"{name}: the weight is {weight.dtype}, but bitsandbytes quantizes only float32, "
                         "float16 and bfloat16 weights; convert the model first (model.float()), "
                         f"or use use_qlora=False to keep the base in {weight.dtype}")
    if weight.device.type != "meta" and not torch.isfinite(weight).all():
        bad = torch.nonzero(~torch.isfinite(weight.detach()))[0].tolist()
        raise ValueError(f"{name}: the weight has NaN or inf entries (the first at index {bad}); quantizing them "
                         "would spread them over a whole block of weights. Load finite weights (is the "
                         "checkpoint damaged, or did an earlier training run diverge?)")


def needs_exact_cpu_dequantize(data: torch.Tensor, state) -> bool:
    """True where bitsandbytes 0.50's CPU 4-bit kernel reads the wrong block scales.

    Measured on bitsandbytes 0.50.2: its CPU kernel looks up the block scales per row, while the
    quantizer lays blocks out over the flattened weight; the two agree only when a row (in_features
    values) is a whole number of blocks.
    """
    return data.device.type == "cpu" and state.shape[-1] % state.blocksize != 0


def dequantize_base(data: torch.Tensor, state) -> torch.Tensor:
    """The dense weight of a bitsandbytes 4-bit tensor, exact on every device.

    Where bitsandbytes' CPU kernel is wrong (see ``needs_exact_cpu_dequantize``) the package's own
    dequantizer, bit-exact with bitsandbytes' flat block layout, does the work instead.
    """
    if getattr(state, "packing_format_for_cpu", False):
        # Qlora_4_bit turns bitsandbytes' CPU repacking off (see _make_4bit); a weight repacked
        # elsewhere has another byte layout, which this function does not guess at.
        raise ValueError("this 4-bit weight was repacked by bitsandbytes' CPU eval path (packing_format_for_cpu); "
                         "dequantize it with bitsandbytes.functional.dequantize_4bit instead")
    if needs_exact_cpu_dequantize(data, state):
        return dequantize_nf4(data, State4bit.from_bnb(state))
    return bnbF.dequantize_4bit(data, state)


class Qlora_4_bit(nn.Module):
    """A frozen base linear layer (4-bit or not) plus the LoRA matrices ``W_a`` and ``W_b``.

    Build it from an existing layer with ``Qlora_4_bit.from_linear(linear, alpha, r, ...)`` (the
    weights are carried over exactly, bias included), or from sizes with
    ``Qlora_4_bit(in_features, out_features, alpha, r, ...)`` (a freshly initialised base).

    Attributes kept from the original README: ``quant_nn`` (the base layer), ``W_a`` (in x r), ``W_b``
    (r x out), ``scale`` (alpha / r, or alpha / sqrt(r) with ``rslora=True``), ``require_lora``,
    ``use_qlora``. ``name`` (optional; ``quantize_model`` passes the qualified name, e.g.
    "model.layers.3.mlp.down_proj") is what error messages call the layer.

    Everything is checked before anything is built: sizes, rank and alpha, quant type, blocksize,
    the weight's dtype and values. The forward checks its input (floating point, last dimension
    ``in_features``).
    """

    def __init__(self, in_features: int, out_features: int, alpha: float, r: int,
                 require_lora: bool = True, use_qlora: bool = True, *, bias: bool = True,
                 rslora: bool = False, compress_statistics: bool = True,
                 compute_dtype: torch.dtype | None = None, quant_type: str = "nf4",
                 blocksize: int = 64, use_dora: bool = False, device=None, dtype: torch.dtype | None = None,
                 linear: nn.Linear | None = None, name: str | None = None):
        super().__init__()
        where = name or f"Qlora_4_bit({in_features} -> {out_features})"
        check_features(in_features, out_features, where)
        check_rank_alpha(r, alpha)
        check_quant_settings(quant_type, blocksize, where)
        check_variant_settings(quant_type, blocksize, compute_dtype, use_dora, require_lora, where)
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"{where}: dtype must be a floating-point dtype, got {dtype}")
        if linear is None:
            linear = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        check_plain_linear(linear, where)
        if (linear.in_features, linear.out_features) != (in_features, out_features):
            raise ValueError(f"{where}: linear is {linear.in_features} -> {linear.out_features}, "
                             f"but in_features={in_features}, out_features={out_features} were given")
        check_weight_to_wrap(linear, where, bool(use_qlora))
        weight = linear.weight

        self.name = name
        self.in_features, self.out_features = in_features, out_features
        self.alpha, self.r, self.rslora = alpha, r, rslora
        self.require_lora, self.use_qlora = bool(require_lora), bool(use_qlora)
        self.use_dora = bool(use_dora)
        self.scale = lora_scale(alpha, r, rslora)
        self.source_dtype = weight.dtype  # what merging returns to (an 8-bit base does not remember it)

        if self.use_qlora and quant_type == "int8":
            self.quant_nn = make_int8_base(linear)
        elif self.use_qlora:
            self.quant_nn = self._make_4bit(linear, compute_dtype or default_compute_dtype(weight.device),
                                            compress_statistics, quant_type, blocksize, where)
        else:
            # LoRA mode: the base *is* the given layer (no copy, its own dtype), frozen.
            self.quant_nn = linear
        self.freeze_base()

        if self.require_lora:
            # Adapters are float32 "master" weights on the base's device; forward casts them to x.dtype.
            self.W_a = nn.Parameter(torch.empty(in_features, r, device=weight.device, dtype=torch.float32))
            self.W_b = nn.Parameter(torch.empty(r, out_features, device=weight.device, dtype=torch.float32))
            init_lora_(self.W_a, self.W_b)
        else:
            self.W_a = None
            self.W_b = None
        # DoRA's magnitude: the length of each output row of W0 + s * dW (= W0 at the start, as W_b = 0).
        self.magnitude = None
        if self.use_dora:
            start = (torch.empty(out_features, device=weight.device) if weight.device.type == "meta"
                     else dora_magnitude(self.base_weight()))
            self.magnitude = nn.Parameter(start.to(torch.float32))

    @classmethod
    def from_linear(cls, linear: nn.Linear, alpha: float, r: int, require_lora: bool = True,
                    use_qlora: bool = True, **kwargs) -> "Qlora_4_bit":
        """Wrap an existing ``nn.Linear``: its weight (quantized or as is) and its bias carry over."""
        check_plain_linear(linear, kwargs.get("name") or "linear")
        return cls(linear.in_features, linear.out_features, alpha, r, require_lora, use_qlora,
                   bias=linear.bias is not None, linear=linear, **kwargs)

    @staticmethod
    def _make_4bit(linear: nn.Linear, compute_dtype, compress_statistics, quant_type, blocksize, where):
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
            state = q.weight.quant_state
            if state.nested and not torch.isfinite(state.offset).all():
                # bitsandbytes stores an infinite offset here, and every weight dequantizes to NaN.
                raise ValueError(
                    f"{where}: double quantization overflows float32 for this weight (largest magnitude "
                    f"{weight.detach().abs().max().item():.3g}): the mean of its block scales is not finite. "
                    "Use compress_statistics=False for it, or scale the weights down")
        # On CPUs with AVX512-BF16, Linear4bit's eval-mode forward repacks the weight into a
        # CPU-only layout and rounds the block scales to bfloat16, so the same layer would give
        # different outputs in train and eval mode. We keep bitsandbytes' standard layout instead.
        q.support_avx512bf16_for_cpu = False
        return q

    # ------------------------------------------------------------------ state
    def freeze_base(self) -> None:
        """Freeze the base layer (weight and bias): only ``W_a`` and ``W_b`` ever train."""
        for p in self.quant_nn.parameters():
            p.requires_grad_(False)

    # ------------------------------------------------------------------ state dict
    # bitsandbytes writes a 4-bit weight into the state dict as the packed bytes ("quant_nn.weight")
    # plus its quantization state ("quant_nn.weight.absmax", ".quant_map", ".quant_state.bitsandbytes__nf4",
    # and with double quantization ".nested_absmax", ".nested_quant_map"), but torch's loader does not
    # know the extra keys: strict loading fails, and non-strict loading copies the bytes but keeps the
    # old block scales. This hook loads the state with the bytes, so state_dict() -> load_state_dict()
    # into a freshly quantized model is bit-exact.
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if self.use_qlora:
            stats_prefix = prefix + "quant_nn.weight."
            stats = {k[len(stats_prefix):]: state_dict.pop(k) for k in list(state_dict) if k.startswith(stats_prefix)}
            packed = state_dict.get(prefix + "quant_nn.weight")
            if stats and packed is not None:
                try:
                    self._load_4bit(packed, stats)
                except ValueError as e:
                    error_msgs.append(f"{prefix[:-1] or self._where()}: {e}")
            elif packed is not None and packed.dtype == torch.uint8 and self.is_quantized:
                error_msgs.append(f"{prefix[:-1] or self._where()}: the state dict holds the packed 4-bit weight "
                                  "but not its quantization state (absmax, quant_map, quant_state); save with "
                                  "model.state_dict() of a quantized model, which includes them")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _load_4bit(self, packed: torch.Tensor, stats: dict) -> None:
        """Replace the 4-bit weight by ``packed`` with the quantization state in ``stats`` (checked first)."""
        try:
            state = bnbF.QuantState.from_dict(dict(stats), device="cpu")
        except (ValueError, KeyError, AssertionError) as e:
            raise ValueError(f"its 4-bit quantization state cannot be read ({e})") from None
        current = self.quant_nn.weight
        have = (current.quant_type, current.blocksize, bool(current.compress_statistics))
        want = (state.quant_type, state.blocksize, state.nested)
        if have != want:
            raise ValueError(f"the saved weight has (quant_type, blocksize, compress_statistics)={want}, the layer "
                             f"{have}; wrap the model with the saved settings before loading")
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise ValueError(f"the saved weight is {tuple(state.shape)}, the layer's "
                             f"{(self.out_features, self.in_features)}")
        if packed.dtype != torch.uint8 or packed.numel() * 2 < state.shape.numel():
            raise ValueError(f"the packed weight is {packed.dtype} {tuple(packed.shape)}, which does not hold "
                             f"{state.shape.numel()} 4-bit values")
        device = current.device if current.device.type != "meta" else torch.device("cpu")
        self.quant_nn.weight = bnb.nn.Params4bit.from_prequantized(
            packed.detach().clone(), dict(stats), requires_grad=False, device=device, module=self.quant_nn)

    @property
    def weight(self):
        """The base layer's weight parameter (packed uint8 in 4-bit mode), for code that reads ``.weight``."""
        return self.quant_nn.weight

    @property
    def bias(self):
        return self.quant_nn.bias

    @property
    def is_int8(self) -> bool:
        """True for an 8-bit (LLM.int8) base."""
        return is_int8_base(self.quant_nn)

    @property
    def is_quantized(self) -> bool:
        return isinstance(self.quant_nn, bnb.nn.Linear4bit) and bool(getattr(self.quant_nn.weight, "bnb_quantized", False))

    # ------------------------------------------------------------------ forward
    def _where(self) -> str:
        return self.name or f"Qlora_4_bit({self.in_features} -> {self.out_features})"

    def check_input(self, x) -> None:
        """The input must be a floating-point tensor whose last dimension is ``in_features``."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self._where()}: the input must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{self._where()}: the input is {x.dtype}, but the layer computes in floating point; "
                            "token ids go through the embedding first, and other inputs need .float()")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{self._where()}: the input has shape {tuple(x.shape)}, but the layer takes "
                             f"in_features={self.in_features} values in the last dimension; "
                             f"pass an input shaped (..., {self.in_features})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if self.use_qlora and self.is_quantized and needs_exact_cpu_dequantize(x, self.quant_nn.weight.quant_state):
            out = self._exact_4bit_forward(x)
        else:
            out = base_forward(self.quant_nn, x)
        if self.use_dora:
            return self._dora_forward(x, out)
        if self.require_lora:
            out = out + lora_forward(x, self.W_a, self.W_b, self.scale)
        return out

    def _dora_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """DoRA: the base output and the LoRA branch, both rescaled row by row by m / ||W0 + s dW||."""
        factor = dora_factor(self.magnitude, self.base_weight().to(x.dtype), self.W_a, self.W_b, self.scale)
        out = dora_output(base_out, self.quant_nn.bias, lora_forward(x, self.W_a, self.W_b, self.scale), factor)
        return out.to(base_out.dtype)

    def _exact_4bit_forward(self, x: torch.Tensor) -> torch.Tensor:
        """What Linear4bit computes (dequantize, then a dense matmul in the compute dtype), with an
        exact dequantization where bitsandbytes' CPU kernel would read the wrong block scales."""
        compute = self.quant_nn.compute_dtype or x.dtype
        weight = self.base_weight().to(compute)
        bias = self.quant_nn.bias
        bias = None if bias is None else bias.to(compute)
        return torch.nn.functional.linear(x.to(compute), weight, bias).to(x.dtype)

    # ------------------------------------------------------------------ dense views (for merging)
    def base_weight(self) -> torch.Tensor:
        """The base's dense (out, in) weight: dequantized in 4-bit mode, else the weight itself.

        In 4-bit mode this is exactly the matrix the forward multiplies with (up to compute dtype),
        returned in the dtype the original weight had.
        """
        if not self.use_qlora:
            return self.quant_nn.weight.detach()
        if self.is_int8:
            return int8_weight(self.quant_nn).to(self.source_dtype)
        w = self.quant_nn.weight
        if not getattr(w, "bnb_quantized", False):  # on meta: nothing was quantized yet
            return w.detach()
        return dequantize_base(w.data, w.quant_state)

    def delta_weight(self) -> torch.Tensor:
        """The LoRA update to the (out, in) weight, s * (W_a @ W_b)^T, in float32 (zeros without LoRA).

        With DoRA the update is not additive; this is then merged_weight() - base_weight().
        """
        if self.use_dora:
            return self.merged_weight() - self.base_weight().float()
        if not self.require_lora:
            return torch.zeros(self.out_features, self.in_features, device=self.quant_nn.weight.device)
        return lora.delta_weight(self.W_a.detach().float(), self.W_b.detach().float(), self.scale)

    def merged_weight(self) -> torch.Tensor:
        """The effective dense (out, in) weight in float32: base_weight() + delta_weight(), by ``lora.merge_weight``."""
        if not self.require_lora:
            return self.base_weight().float()
        if self.use_dora:
            return dora_merged_weight(self.base_weight(), self.W_a, self.W_b, self.scale, self.magnitude)
        return lora.merge_weight(self.base_weight().float(), self.W_a.detach(), self.W_b.detach(), self.scale)

    def extra_repr(self) -> str:
        mode = ("QLoRA" if self.require_lora else "4-bit only") if self.use_qlora else (
            "LoRA" if self.require_lora else "frozen base only")
        if self.is_int8:
            mode = "8-bit base + LoRA" if self.require_lora else "8-bit only"
        if self.use_dora:
            mode += " (DoRA)"
        return (f"in_features={self.in_features}, out_features={self.out_features}, mode={mode}, "
                f"r={self.r}, alpha={self.alpha}, scale={self.scale:g}")

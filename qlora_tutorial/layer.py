"""``Qlora_4_bit``: one linear layer = a frozen base plus an optional trainable low-rank update.

    y = base(x) + s * (x @ W_a) @ W_b          W_a: (in, r),  W_b: (r, out),  s = alpha / r

The frozen base is an object of its own, picked once when the layer is built, from the original
README's two switches and the quant type:

* ``Base4bit`` (``use_qlora=True``, the default): the weight as NF4 (or FP4), blockwise 4-bit with
  double quantization, stored as bitsandbytes stores it, and multiplied by the book's 4-bit matmul
  (``matmul4bit.MatMul4bit``), which dequantizes it on the fly in every forward and backward pass.
* ``DenseBase`` (``use_qlora=False``): the original weight, frozen, in its own dtype (LoRA).
* ``Base8bit`` (``quant_type="int8"``): the weight in 8 bits (LLM.int8, bitsandbytes' ``Linear8bitLt``).

Every base answers the same questions: ``base(x)`` (its forward), ``base.dense_weight()``, its
``source_dtype`` (the dtype its weight had) and ``base.settings()`` (how to build it again). Other
modules ask the base rather than its internals; what it stores is counted by ``memory.weight_bytes``,
the package's one byte accounting.

``require_lora=False`` leaves the LoRA matrices out (quantization only, for inference), and
``use_dora=True`` adds DoRA's trainable ``magnitude``. The LoRA math itself (scale, init, the
low-rank branch, the (out, in) update, DoRA) lives in ``qlora_tutorial.lora``.

The layer's state dict holds a 4-bit weight as bitsandbytes writes it (packed bytes plus the
quantization state), and ``load_state_dict`` reads all of it back, so a quantized model saved with
``state_dict()`` loads bit-exact into a freshly quantized one.
"""
from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import torch
from torch import nn

from . import lora
from .lora import check_rank_alpha, init_lora_, lora_forward, lora_scale
from .matmul4bit import dequantize, matmul_4bit
from .nf4 import BLOCKSIZES, State4bit

# What bitsandbytes' 4-bit quantizer takes (float64 and integer weights fail inside it).
QUANTIZABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
QUANT_TYPES = ("nf4", "fp4", "int8")
INT8_THRESHOLD = 6.0  # LLM.int8's outlier threshold (bitsandbytes' and transformers' default)

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


# ---------------------------------------------------------------- checks, before anything is built
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


def check_variant_settings(quant_type, blocksize, compute_dtype, use_dora, require_lora, name: str,
                           use_qlora: bool = True, double_quant=None, rslora: bool = False) -> None:
    """Settings that only some modes use, refused where they would be ignored: DoRA needs the LoRA
    matrices; the quantization settings need a quantized base (``use_qlora=True``); an 8-bit base has
    neither a blocksize (one scale per row) nor a compute dtype (``Linear8bitLt`` computes in the input's)."""
    if use_dora and not require_lora:
        raise ValueError(f"{name}: use_dora=True needs the LoRA matrices (require_lora=True): DoRA rescales "
                         "W0 + s * dW, and without an adapter there is nothing to train")
    if rslora and not require_lora:
        raise ValueError(f"{name}: rslora=True sets the LoRA scale, but require_lora=False builds no LoRA matrices; "
                         "leave rslora out")
    if quant_type == "int8" and not use_qlora:
        raise ValueError(f"{name}: quant_type='int8' asks for an 8-bit base, but use_qlora=False keeps the base "
                         "unquantized; use use_qlora=True for the 8-bit base, or leave quant_type out for LoRA")
    if not use_qlora:
        given = {k: v for k, v in (("quant_type", None if quant_type == "nf4" else quant_type),
                                   ("blocksize", None if blocksize == 64 else blocksize),
                                   ("double_quant", double_quant), ("compute_dtype", compute_dtype)) if v is not None}
        if given:
            detail = ", ".join(f"{k}={v!r}" for k, v in given.items())
            raise ValueError(f"{name}: use_qlora=False keeps the base unquantized, in its own dtype, so {detail} "
                             "would change nothing; leave it out, or use use_qlora=True for a quantized base")
    if quant_type == "int8" and (blocksize != 64 or compute_dtype is not None or double_quant is not None):
        raise ValueError(f"{name}: quant_type='int8' (LLM.int8) has one scale per row and computes in the input's "
                         f"dtype; blocksize={blocksize!r}, compute_dtype={compute_dtype!r} and double_quant="
                         f"{double_quant!r} apply to 4-bit bases only. Leave them at their defaults")


def resolve_double_quant(double_quant, compress_statistics, name: str) -> bool:
    """``double_quant`` (default True, as the QLoRA paper), or bitsandbytes' name for it,
    ``compress_statistics``, if that is given instead; both, disagreeing, is an error."""
    if compress_statistics is None:
        return True if double_quant is None else bool(double_quant)
    if double_quant is not None and bool(double_quant) != bool(compress_statistics):
        raise ValueError(f"{name}: double_quant={double_quant!r} and compress_statistics={compress_statistics!r} "
                         "are the same setting (compress_statistics is bitsandbytes' name); give one of them")
    return bool(compress_statistics)


def check_weight_to_wrap(linear: nn.Linear, name: str, use_qlora: bool, quant_type: str = "nf4") -> None:
    """A weight Qlora_4_bit can hold: floating point, a dtype bitsandbytes quantizes, finite, and for an
    8-bit base within float16's range."""
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
    if use_qlora and quant_type == "int8" and weight.device.type != "meta":
        largest = weight.detach().abs().max().item()
        if largest > torch.finfo(torch.float16).max:
            raise ValueError(f"{name}: the weight has entries beyond float16's range (largest magnitude "
                             f"{largest:.3g}), "
                             "and quant_type='int8' (bitsandbytes' LLM.int8) rounds the weight to float16 before "
                             "quantizing it: they would become inf, and the outputs NaN. Use a 4-bit base "
                             "(quant_type='nf4'), whose block scales stay in float32, or scale the weights down")


# ---------------------------------------------------------------- the frozen bases
class DenseBase(nn.Linear):
    """The frozen weight as it is (LoRA): the given layer's own parameters, shared, not copied."""

    @classmethod
    def wrap(cls, linear: nn.Linear) -> "DenseBase":
        base = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        base.weight, base.bias = linear.weight, linear.bias
        return base

    @property
    def source_dtype(self) -> torch.dtype:
        return self.weight.dtype

    def dense_weight(self) -> torch.Tensor:
        return self.weight.detach()

    def settings(self) -> dict:
        return {}


class Base4bit(bnb.nn.Linear4bit):
    """A frozen 4-bit weight (NF4 or FP4): bitsandbytes' storage, the book's 4-bit matmul.

    The weight is a ``bnb.nn.Params4bit`` holding the packed bytes and bitsandbytes' ``QuantState``
    (so that the state dict, ``model.to(...)`` and FSDP work as for any ``Linear4bit``); ``state()``
    reads that state as the package's ``State4bit``. The forward is what ``Linear4bit`` computes
    (input and bias in the compute dtype, the output back in the input's dtype), through
    ``matmul4bit.MatMul4bit``.
    """

    where = "the 4-bit base"  # what errors call it; quantize() gives it the layer's name

    @classmethod
    def quantize(cls, linear: nn.Linear, compute_dtype: torch.dtype, double_quant: bool, quant_type: str,
                 blocksize: int, where: str) -> "Base4bit":
        """``linear``'s weight quantized now (unless it is on ``meta``), its bias copied."""
        weight = linear.weight
        base = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=compute_dtype,
                   compress_statistics=double_quant, quant_type=quant_type, device="meta")
        base.weight = bnb.nn.Params4bit(weight.detach(), requires_grad=False, blocksize=blocksize,
                                        compress_statistics=double_quant, quant_type=quant_type, module=base)
        if linear.bias is not None:
            base.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        # bitsandbytes quantizes a Params4bit the first time it is moved to a (non-meta) device,
        # and only then; moving it to the device it is already on is how we ask for it now.
        if weight.device.type != "meta":
            base.to(weight.device)
            state = base.weight.quant_state
            if state.nested and not torch.isfinite(state.offset).all():
                # bitsandbytes stores an infinite offset here, and every weight dequantizes to NaN.
                raise ValueError(
                    f"{where}: double quantization overflows float32 for this weight (largest magnitude "
                    f"{weight.detach().abs().max().item():.3g}): the mean of its block scales is not finite. "
                    "Use double_quant=False for it, or scale the weights down")
        # On CPUs with AVX512-BF16, bitsandbytes' own forward repacks the weight into a CPU-only layout in
        # eval mode; ours never runs it, and this flag keeps other code that calls it from doing so.
        base.support_avx512bf16_for_cpu = False
        base.where = where  # what errors call the layer
        return base

    @property
    def is_quantized(self) -> bool:
        """False on the ``meta`` device, where nothing has been quantized yet."""
        return bool(getattr(self.weight, "bnb_quantized", False))

    @property
    def source_dtype(self) -> torch.dtype:
        """The dtype of the weight before it was quantized (what dequantizing and merging return to)."""
        return self.weight.quant_state.dtype if self.is_quantized else self.weight.dtype

    def state(self) -> State4bit:
        """The quantization state (block scales, code, double quantization) as the package's ``State4bit``."""
        return State4bit.from_bnb(self.weight.quant_state)

    def packed(self) -> torch.Tensor:
        """The packed bytes, as uint8 (FSDP may store them as another dtype: ``fsdp.set_quant_storage``)."""
        data = self.weight.data
        return data if data.dtype == torch.uint8 else data.view(torch.uint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_quantized:
            raise RuntimeError(f"{self.where}: its 4-bit weight is not quantized yet (the layer was built on the meta "
                               "device); move the model to its device first, which quantizes it")
        compute = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(compute)
        return matmul_4bit(x.to(compute), self.packed(), self.state(), bias).to(x.dtype)

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) weight the forward multiplies with, in the dtype it was quantized from."""
        if not self.is_quantized:  # on meta: nothing was quantized yet
            return self.weight.detach()
        return dequantize(self.packed(), self.state())

    def settings(self) -> dict:
        # from the quantization state, which the module keeps too (FSDP shards the weight into a plain
        # tensor); on meta, where nothing is quantized yet, from the weight's settings
        state = getattr(self.weight, "quant_state", None) or getattr(self, "quant_state", None)
        if state is not None:
            settings = {"quant_type": state.quant_type, "blocksize": state.blocksize, "double_quant": state.nested}
        else:
            w = self.weight
            settings = {"quant_type": w.quant_type, "blocksize": w.blocksize,
                        "double_quant": bool(w.compress_statistics)}
        return {**settings, "compute_dtype": self.compute_dtype}

    # bitsandbytes writes a 4-bit weight into the state dict as the packed bytes ("weight") plus its
    # quantization state ("weight.absmax", ".quant_map", ".quant_state.bitsandbytes__nf4", and with
    # double quantization ".nested_absmax", ".nested_quant_map"), but torch's loader does not know the
    # extra keys: strict loading fails, and non-strict loading copies the bytes but keeps the old block
    # scales. This hook loads the state with the bytes, so state_dict() -> load_state_dict() into a
    # freshly quantized model is bit-exact.
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        stats_prefix = prefix + "weight."
        stats = {k[len(stats_prefix):]: state_dict.pop(k) for k in list(state_dict) if k.startswith(stats_prefix)}
        packed = state_dict.get(prefix + "weight")
        # errors name the Qlora_4_bit layer: its place in the model, or its own name when loaded alone
        where = prefix[:-1].removesuffix("quant_nn").rstrip(".") or self.where
        if stats and packed is not None:
            try:
                self._load_4bit(packed, stats)
            except ValueError as e:
                error_msgs.append(f"{where}: {e}")
        elif packed is not None and packed.dtype == torch.uint8 and self.is_quantized:
            error_msgs.append(f"{where}: the state dict holds the packed 4-bit weight but not its quantization "
                              "state (absmax, quant_map, quant_state); save with model.state_dict() of a quantized "
                              "model, which includes them")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def check_saved(self, packed: torch.Tensor, stats: dict) -> None:
        """Raise a ValueError unless ``packed`` and ``stats`` (this weight's entries of a state dict, without
        their prefix) are a 4-bit weight this base can load: a readable quantization state with this base's
        settings and shape, and bytes that hold it."""
        try:
            state = bnbF.QuantState.from_dict(dict(stats), device="cpu")
        except Exception as e:  # whatever a damaged entry makes bitsandbytes raise
            raise ValueError(f"its 4-bit quantization state cannot be read ({type(e).__name__}: {e}); the file "
                             "is damaged, or was not written by state_dict() of a quantized model") from None
        settings = self.settings()
        have = (settings["quant_type"], settings["blocksize"], settings["double_quant"])
        want = (state.quant_type, state.blocksize, state.nested)
        if have != want:
            raise ValueError(f"the saved weight has (quant_type, blocksize, double_quant)={want}, the layer "
                             f"{have}; wrap the model with the saved settings before loading")
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise ValueError(f"the saved weight is {tuple(state.shape)}, the layer's "
                             f"{(self.out_features, self.in_features)}")
        if packed.dtype != torch.uint8 or packed.numel() * 2 < state.shape.numel():
            raise ValueError(f"the packed weight is {packed.dtype} {tuple(packed.shape)}, which does not hold "
                             f"{state.shape.numel()} 4-bit values")

    def _load_4bit(self, packed: torch.Tensor, stats: dict) -> None:
        """Replace the 4-bit weight by ``packed`` with the quantization state in ``stats`` (checked first)."""
        self.check_saved(packed, stats)
        device = self.weight.device if self.weight.device.type != "meta" else torch.device("cpu")
        self.weight = bnb.nn.Params4bit.from_prequantized(packed.detach().clone(), dict(stats), requires_grad=False,
                                                          device=device, module=self)


class Base8bit(bnb.nn.Linear8bitLt):
    """A frozen 8-bit weight (LLM.int8, Dettmers et al. 2022): bitsandbytes' ``Linear8bitLt``.

    Each weight row is rounded to float16 and stored as int8 codes, code = round(w * 127 / absmax of
    its row), with the row's absmax in float32. The forward (bitsandbytes') quantizes the input
    row-wise too, except the feature columns holding an outlier above ``threshold`` (6.0), which it
    multiplies in 16 bits: the "mixed-precision decomposition".

    bitsandbytes 0.50 computes differently on a CPU in the two modes: in training mode it multiplies by
    the dequantized weight, in eval mode it quantizes the input as well. This base keeps the training
    path in both modes (on CUDA both modes take the LLM.int8 path anyway), so a model gives the same
    outputs after ``.eval()``. Its forward also leaves the bias as it is: bitsandbytes' own forward
    converts the stored bias to the input's dtype for good.
    """

    source_dtype = torch.float32  # the dtype the weight had (the int8 codes do not remember it); set by quantize

    @classmethod
    def quantize(cls, linear: nn.Linear, threshold: float = INT8_THRESHOLD) -> "Base8bit":
        """``linear``'s weight as int8 rows, quantized now (unless on ``meta``); only the codes and the
        row scales are kept (``has_fp16_weights=False``: one byte per weight)."""
        weight = linear.weight
        base = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, has_fp16_weights=False,
                   threshold=threshold, device="meta")
        base.weight = bnb.nn.Int8Params(weight.detach().clone(), requires_grad=False, has_fp16_weights=False)
        if linear.bias is not None:
            base.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        if weight.device.type != "meta":
            base.to(weight.device)  # bitsandbytes quantizes an Int8Params when it is moved to a device
        base.source_dtype = weight.dtype  # the int8 codes do not remember it
        return base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.state.is_training = True  # one path in both modes (see the class's docstring)
        if self.weight.CB is not None:  # the codes move to the matmul state at the first forward
            self.init_8bit_state()
        bias = None if self.bias is None else self.bias.to(x.dtype)
        out = bnb.matmul(x, self.weight, bias=bias, state=self.state)
        if self.state.CB is not None:  # has_fp16_weights=False: the weight keeps holding the codes
            self.weight.data = self.state.CB
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # After the first forward, bitsandbytes keeps the row scales on the matmul state, where its own
        # loader does not look (it refuses the checkpoint): copy them there.
        key = prefix + "SCB"
        if key in state_dict and getattr(self.weight, "SCB", None) is None and self.state.SCB is not None:
            self.state.SCB.copy_(state_dict.pop(key))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def row_scales(self) -> torch.Tensor:
        """The float32 scale of each weight row (its absmax): kept on the weight until the first
        forward, then on the layer's matmul state."""
        scales = getattr(self.weight, "SCB", None)
        if scales is None:
            scales = self.state.SCB
        if scales is None:
            raise ValueError("this 8-bit base holds no row scales (SCB): it was never quantized")
        return scales

    def dense_weight(self) -> torch.Tensor:
        """The dense (out, in) weight the codes stand for, codes * absmax / 127 row by row, in the
        dtype the weight had before."""
        return (self.weight.data.float() * (self.row_scales().float() / 127).unsqueeze(1)).to(self.source_dtype)

    def settings(self) -> dict:
        return {"quant_type": "int8"}


FROZEN_BASES = (DenseBase, Base4bit, Base8bit)


def make_base(linear: nn.Linear, use_qlora: bool, quant_type: str, blocksize: int, double_quant: bool,
              compute_dtype, where: str) -> nn.Module:
    """The frozen base for ``linear``, picked once from the settings (already checked)."""
    if not use_qlora:
        return DenseBase.wrap(linear)
    if quant_type == "int8":
        return Base8bit.quantize(linear)
    return Base4bit.quantize(linear, compute_dtype or default_compute_dtype(linear.weight.device), double_quant,
                             quant_type, blocksize, where)


# ---------------------------------------------------------------- the layer
class Qlora_4_bit(nn.Module):
    """A frozen base linear layer (4-bit or not) plus the LoRA matrices ``W_a`` and ``W_b``.

    Build it from an existing layer with ``Qlora_4_bit.from_linear(linear, alpha, r, ...)`` (the
    weights are carried over exactly, bias included), or from sizes with
    ``Qlora_4_bit(in_features, out_features, alpha, r, ...)`` (a freshly initialised base).

    Attributes kept from the original README: ``quant_nn`` (the base layer), ``W_a`` (in x r), ``W_b``
    (r x out), ``scale`` (alpha / r, or alpha / sqrt(r) with ``rslora=True``), ``require_lora``,
    ``use_qlora``. ``name`` (optional; ``quantize_model`` passes the qualified name, e.g.
    "model.layers.3.mlp.down_proj") is what error messages call the layer. ``double_quant`` (default:
    True, as in the QLoRA paper) stores the block scales in 8 bits; ``compress_statistics`` is accepted
    as bitsandbytes' name for it. ``quant_type`` is the base's format: "nf4" (default), "fp4" or "int8".

    Everything is checked before anything is built: sizes, rank and alpha, quant type, blocksize,
    the weight's dtype and values. The forward checks its input (floating point, last dimension
    ``in_features``).
    """

    def __init__(self, in_features: int, out_features: int, alpha: float, r: int,
                 require_lora: bool = True, use_qlora: bool = True, *, bias: bool = True,
                 rslora: bool = False, double_quant: bool | None = None, compress_statistics: bool | None = None,
                 compute_dtype: torch.dtype | None = None, quant_type: str = "nf4",
                 blocksize: int = 64, use_dora: bool = False, device=None, dtype: torch.dtype | None = None,
                 linear: nn.Linear | None = None, name: str | None = None):
        super().__init__()
        where = name or f"Qlora_4_bit({in_features} -> {out_features})"
        check_features(in_features, out_features, where)
        check_rank_alpha(r, alpha)
        check_quant_settings(quant_type, blocksize, where)
        check_variant_settings(quant_type, blocksize, compute_dtype, use_dora, require_lora, where, bool(use_qlora),
                               double_quant if compress_statistics is None else compress_statistics, rslora)
        double_quant = resolve_double_quant(double_quant, compress_statistics, where)
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"{where}: dtype must be a floating-point dtype, got {dtype}")
        if linear is None:
            linear = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        elif device is not None or dtype is not None or bias != (linear.bias is not None):
            raise ValueError(f"{where}: with linear=..., the weight, its dtype, its device and the bias are the given "
                             f"layer's (bias={linear.bias is not None}); device=, dtype= and bias= describe a new "
                             "layer. Move or convert the layer first, or leave them out")
        check_plain_linear(linear, where)
        if (linear.in_features, linear.out_features) != (in_features, out_features):
            raise ValueError(f"{where}: linear is {linear.in_features} -> {linear.out_features}, "
                             f"but in_features={in_features}, out_features={out_features} were given")
        check_weight_to_wrap(linear, where, bool(use_qlora), quant_type)
        weight = linear.weight

        self.name = name
        self.in_features, self.out_features = in_features, out_features
        self.alpha, self.r, self.rslora = alpha, r, rslora
        self.require_lora, self.use_qlora = bool(require_lora), bool(use_qlora)
        self.use_dora = bool(use_dora)
        self.scale = lora_scale(alpha, r, rslora)
        self.quant_nn = make_base(linear, self.use_qlora, quant_type, blocksize, double_quant, compute_dtype, where)
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
                     else lora.dora_magnitude(self.base_weight()))
            self.magnitude = nn.Parameter(start.to(torch.float32))

    @classmethod
    def from_linear(cls, linear: nn.Linear, alpha: float, r: int, require_lora: bool = True,
                    use_qlora: bool = True, **kwargs) -> "Qlora_4_bit":
        """Wrap an existing ``nn.Linear``: its weight (quantized or as is) and its bias carry over."""
        check_plain_linear(linear, kwargs.get("name") or "linear")
        return cls(linear.in_features, linear.out_features, alpha, r, require_lora, use_qlora,
                   bias=linear.bias is not None, linear=linear, **kwargs)

    def freeze_base(self) -> None:
        """Freeze the base layer (weight and bias): only ``W_a`` and ``W_b`` (and DoRA's magnitude) ever train."""
        self.quant_nn.requires_grad_(False)

    # ------------------------------------------------------------------ what the layer is
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
        return isinstance(self.quant_nn, Base8bit)

    @property
    def is_quantized(self) -> bool:
        """True for a 4-bit base whose weight has been quantized (not on ``meta``)."""
        return isinstance(self.quant_nn, Base4bit) and self.quant_nn.is_quantized

    def settings(self) -> dict:
        """What ``quantize_model`` needs to build this layer again: the LoRA settings and the base's."""
        return dict(alpha=self.alpha, r=self.r, require_lora=self.require_lora, use_qlora=self.use_qlora,
                    rslora=self.rslora, use_dora=self.use_dora, **self.quant_nn.settings())

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
        out = self.quant_nn(x)
        if self.use_dora:
            factor = lora.dora_factor(self.magnitude, self.base_weight().to(x.dtype), self.W_a, self.W_b, self.scale)
            lora_out = lora_forward(x, self.W_a, self.W_b, self.scale)
            return lora.dora_output(out, self.quant_nn.bias, lora_out, factor).to(out.dtype)
        if self.require_lora:
            out = out + lora_forward(x, self.W_a, self.W_b, self.scale)
        return out

    # ------------------------------------------------------------------ dense views (for merging)
    def base_weight(self) -> torch.Tensor:
        """The base's dense (out, in) weight: dequantized in 4-bit and 8-bit mode, else the weight itself,
        in the dtype the original weight had. In 4-bit mode this is exactly the matrix the forward
        multiplies with (up to compute dtype)."""
        return self.quant_nn.dense_weight()

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
            return lora.dora_merged_weight(self.base_weight(), self.W_a, self.W_b, self.scale, self.magnitude)
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

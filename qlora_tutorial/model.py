"""Put ``Qlora_4_bit`` layers into a whole model, freeze the rest, and count what trains.

``quantize_model(model, ["gate_proj", "up_proj", "down_proj"], alpha=4, r=2)`` walks the module
tree, replaces every ``nn.Linear`` whose name matches a target with a ``Qlora_4_bit`` built from it,
and freezes every parameter that is not a LoRA matrix. Calling it again wraps nothing twice.

``count_parameters`` counts *logical* parameters: bitsandbytes packs two 4-bit weights into one
byte, so a quantized (out, in) weight reports ``numel() == out * in / 2``; we count it as out * in,
as PEFT's ``print_trainable_parameters`` does.
"""
from __future__ import annotations

import bitsandbytes as bnb
from torch import nn

from .layer import QUANTIZED_LINEAR_TYPES, Qlora_4_bit
from .lora import check_rank_alpha, resolve_target_names, target_matches


# ---------------------------------------------------------------- targets
# Target names (presets "mlp" / "attention" / "all", plain or dotted names) are resolved and matched
# by qlora_tutorial.lora: resolve_target_names and target_matches.
def linear_names(module: nn.Module) -> list[str]:
    """The distinct names of the linear layers in ``module`` (wrapped ones included), in model order."""
    names = []
    for qualified, child in module.named_modules():
        if isinstance(child, (nn.Linear, Qlora_4_bit)) and qualified and not qualified.endswith(".quant_nn"):
            last = qualified.rsplit(".", 1)[-1]
            if last not in names:
                names.append(last)
    return names


def wrapped_layers(module: nn.Module) -> list[str]:
    """The qualified names of the Qlora_4_bit layers in ``module``."""
    return [name for name, child in module.named_modules() if isinstance(child, Qlora_4_bit)]


def _walk(module: nn.Module, prefix: str = ""):
    """Yield (parent, attribute name, qualified name, child), not descending into Qlora_4_bit layers."""
    for name, child in module.named_children():
        qualified = f"{prefix}.{name}" if prefix else name
        yield module, name, qualified, child
        if not isinstance(child, Qlora_4_bit):
            yield from _walk(child, qualified)


def _check_not_prequantized(module: nn.Module) -> None:
    if getattr(module, "is_loaded_in_4bit", False) or getattr(module, "is_loaded_in_8bit", False):
        raise ValueError("this model was loaded already quantized by transformers (BitsAndBytesConfig); "
                         "load it without quantization_config and let quantize_model quantize it")
    found = [q for _, _, q, c in _walk(module) if isinstance(c, QUANTIZED_LINEAR_TYPES)]
    if found:
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise ValueError(f"the model already holds bitsandbytes-quantized layers ({shown}), e.g. because it was "
                         "loaded with a BitsAndBytesConfig; load it without quantization_config and let "
                         "quantize_model quantize it")


# ---------------------------------------------------------------- the seed's function
def quantize_model(module: nn.Module, mlp_layers, alpha: float, r: int, require_lora: bool = True,
                   use_qlora: bool = True, *, rslora: bool = False, compress_statistics: bool = True,
                   compute_dtype=None, quant_type: str = "nf4", blocksize: int = 64,
                   freeze: bool = True) -> nn.Module:
    """Replace the ``nn.Linear`` layers named in ``mlp_layers`` by ``Qlora_4_bit`` layers; return ``module``.

    * ``mlp_layers``: layer names ("gate_proj"), dotted tails ("self_attn.q_proj"), or a preset
      name from ``lora.TARGET_PRESETS`` ("mlp", "attention", "all"). ``lm_head`` is only wrapped
      when named. Every target must match at least one layer.
    * Layers already wrapped are left as they are (a second call wraps nothing twice); asking for
      a different configuration on an already wrapped layer is an error.
    * With ``freeze=True`` (default) every parameter except the LoRA matrices is frozen, embeddings
      and norms included.
    The other keywords go to ``Qlora_4_bit`` (``compute_dtype=None``: the device helper's dtype).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    check_rank_alpha(r, alpha)
    targets = resolve_target_names(mlp_layers)
    _check_not_prequantized(module)

    # Who shares a parameter with whom (tied embeddings: lm_head.weight is embed_tokens.weight).
    owners: dict[int, int] = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1

    matched = {t: [] for t in targets}
    to_wrap = []
    for parent, name, qualified, child in _walk(module):
        hits = [t for t in targets if target_matches(qualified, t)]
        if not hits:
            continue
        for t in hits:
            matched[t].append(qualified)
        if isinstance(child, Qlora_4_bit):
            _check_same_config(child, qualified, alpha, r, require_lora, use_qlora, rslora)
            continue
        if not isinstance(child, nn.Linear):
            inner = dict.fromkeys(n.rsplit(".", 1)[-1] for n, c in child.named_modules() if n and isinstance(c, nn.Linear))
            hint = f"; name its linear layers instead: {', '.join(inner)}" if inner else ""
            raise TypeError(f"target {hits[0]!r} matches {qualified}, a {type(child).__name__}, not an nn.Linear{hint}")
        if owners.get(id(child.weight), 0) > 1:
            raise ValueError(f"{qualified}.weight is shared with another layer (tied embeddings); wrapping it "
                             "would untie them. Leave it out of mlp_layers (LoRA rarely targets lm_head).")
        to_wrap.append((parent, name, child))

    missing = [t for t, hits in matched.items() if not hits]
    if missing:
        raise ValueError(f"no layer of the model matches {missing}; the linear layers it has are named: "
                         f"{', '.join(linear_names(module))}")

    for parent, name, child in to_wrap:
        setattr(parent, name, Qlora_4_bit.from_linear(
            child, alpha, r, require_lora, use_qlora, rslora=rslora, compress_statistics=compress_statistics,
            compute_dtype=compute_dtype, quant_type=quant_type, blocksize=blocksize))

    if freeze:
        freeze_non_lora(module)
    return module


def _check_same_config(layer: Qlora_4_bit, qualified, alpha, r, require_lora, use_qlora, rslora) -> None:
    have = (layer.alpha, layer.r, layer.require_lora, layer.use_qlora, layer.rslora)
    want = (alpha, r, bool(require_lora), bool(use_qlora), rslora)
    if have != want:
        raise ValueError(f"{qualified} is already a Qlora_4_bit with (alpha, r, require_lora, use_qlora, rslora)="
                         f"{have}, not {want}; a layer is wrapped once. Start from a fresh model to change it.")


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The LoRA matrices (W_a, W_b) of every Qlora_4_bit layer in ``module``."""
    return [p for m in module.modules() if isinstance(m, Qlora_4_bit) and m.require_lora for p in (m.W_a, m.W_b)]


def freeze_non_lora(module: nn.Module) -> None:
    """Make exactly the LoRA matrices trainable: every other parameter gets requires_grad=False."""
    lora_ids = {id(p) for p in lora_parameters(module)}
    for p in module.parameters():
        p.requires_grad_(id(p) in lora_ids)


# ---------------------------------------------------------------- counting
def logical_numel(p) -> int:
    """How many weights a parameter stands for: a packed 4-bit weight counts out * in, not its bytes."""
    if isinstance(p, bnb.nn.Params4bit) and getattr(p, "bnb_quantized", False) and p.quant_state is not None:
        return p.quant_state.shape.numel()
    return p.numel()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) logical parameter counts; shared (tied) parameters count once."""
    trainable = total = 0
    for p in model.parameters():
        n = logical_numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def print_trainable(model: nn.Module) -> tuple[int, int]:
    """Print the trainable and total logical parameter counts (and the share); return them."""
    trainable, total = count_parameters(model)
    share = 100 * trainable / total if total else 0.0
    print(f"Trainable: {trainable:,} of {total:,} parameters ({share:.3f}%)")
    return trainable, total

"""Put ``Qlora_4_bit`` layers into a whole model, freeze the rest, and count what trains.

``quantize_model(model, ["gate_proj", "up_proj", "down_proj"], alpha=4, r=2)`` walks the module
tree, replaces every ``nn.Linear`` whose name matches a target with a ``Qlora_4_bit`` built from it,
and freezes every parameter that is not a LoRA matrix. Calling it again wraps nothing twice.
Everything is checked before the model is touched; if anything still fails, ``unchanged_on_error``
puts every submodule and ``requires_grad`` flag back, so a failed call leaves the model as it was.

``count_parameters`` counts *logical* parameters: bitsandbytes packs two 4-bit weights into one
byte, so a quantized (out, in) weight reports ``numel() == out * in / 2``; we count it as out * in,
as PEFT's ``print_trainable_parameters`` does.
"""
from __future__ import annotations

from contextlib import contextmanager

import bitsandbytes as bnb
import torch
from torch import nn

from .layer import (QUANTIZED_LINEAR_TYPES, Qlora_4_bit, check_features, check_quant_settings, check_variant_settings,
                    check_weight_to_wrap, resolve_double_quant)
from .lora import check_rank_alpha, resolve_target_names, target_matches


# ---------------------------------------------------------------- targets
# Target names (presets "mlp" / "attention" / "all", plain or dotted names) are resolved and matched
# by qlora_tutorial.lora: resolve_target_names and target_matches.
def linear_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, layer) of every linear layer in ``module``, in model order: each ``nn.Linear``
    and each ``Qlora_4_bit``, but not the base layer inside a ``Qlora_4_bit`` (its ``quant_nn``)."""
    bases = {id(m.quant_nn) for m in module.modules() if isinstance(m, Qlora_4_bit)}
    return [(q, m) for q, m in module.named_modules()
            if q and isinstance(m, (nn.Linear, Qlora_4_bit)) and id(m) not in bases]


def linear_names(module: nn.Module) -> list[str]:
    """The distinct names of the linear layers in ``module`` (wrapped ones included), in model order."""
    return list(dict.fromkeys(q.rsplit(".", 1)[-1] for q, _ in linear_layers(module)))


def name_list(names, limit: int = 4) -> str:
    """'a, b, c, d and 5 more': the first ``limit`` names, for an error message."""
    names = list(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


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
        raise ValueError(f"the model already holds bitsandbytes-quantized layers ({name_list(found, 3)}), e.g. because it was "
                         "loaded with a BitsAndBytesConfig; load it without quantization_config and let "
                         "quantize_model quantize it")


# ---------------------------------------------------------------- failing without side effects
@contextmanager
def unchanged_on_error(module: nn.Module, values: bool = False):
    """Run a block that rewires ``module``; if it raises, put the module tree back as it was.

    Restores every submodule and parameter slot (so wrapped layers become the original ones again),
    every ``requires_grad`` flag, and the ``save_pretrained`` guard. With ``values=True`` it also keeps a
    copy of every tensor of the state dict and puts the values back, for blocks that copy *into*
    existing tensors (``load_state_dict``): a second copy of the model's memory while the block runs.
    Without it, callers check what they load before they copy it.
    """
    modules = list(module.modules())
    slots = [(m, dict(m._modules), dict(m._parameters)) for m in modules]
    flags = [(p, p.requires_grad) for m in modules for p in m._parameters.values() if p is not None]
    guard = module.__dict__.get("save_pretrained")
    saved = {}
    if values:
        for t in module.state_dict(keep_vars=True).values():
            if isinstance(t, torch.Tensor) and id(t) not in saved:
                saved[id(t)] = (t, t.detach().clone())
    try:
        yield
    except BaseException:
        for m, children, params in slots:
            m._modules.clear()
            m._modules.update(children)
            m._parameters.clear()
            m._parameters.update(params)
        for p, flag in flags:
            p.requires_grad_(flag)
        for t, copy in saved.values():
            t.data = copy
        if guard is None:
            module.__dict__.pop("save_pretrained", None)
        else:
            module.__dict__["save_pretrained"] = guard
        raise


def _refuse_save_pretrained(*args, **kwargs):
    raise RuntimeError(
        "save_pretrained cannot save a model with Qlora_4_bit layers: from_pretrained would not know them and "
        "would silently re-initialise those layers at random. Instead save the adapter with "
        "qlora_tutorial.adapters.save_adapter(model, folder) (or export_peft for PEFT), save the whole quantized "
        "model with qlora_tutorial.adapters.save_quantized(model, folder), or merge(model) first and then call "
        "save_pretrained. (The Trainer calls save_pretrained for checkpoints: train with save_strategy='no' and "
        "save the adapter afterwards, as qlora_tutorial.train does.)")


def guard_save_pretrained(module: nn.Module) -> None:
    """Make ``module.save_pretrained`` refuse while the model holds Qlora_4_bit layers, and work again after."""
    if not hasattr(type(module), "save_pretrained"):
        return
    if wrapped_layers(module):
        module.__dict__["save_pretrained"] = _refuse_save_pretrained
    else:
        module.__dict__.pop("save_pretrained", None)


# ---------------------------------------------------------------- the original README's function
def quantize_model(module: nn.Module, mlp_layers, alpha: float, r: int, require_lora: bool = True,
                   use_qlora: bool = True, *, rslora: bool = False, double_quant: bool | None = None,
                   compress_statistics: bool | None = None, compute_dtype=None, quant_type: str = "nf4",
                   blocksize: int = 64, use_dora: bool = False, freeze: bool = True) -> nn.Module:
    """Replace the ``nn.Linear`` layers named in ``mlp_layers`` by ``Qlora_4_bit`` layers; return ``module``.

    * ``mlp_layers``: layer names ("gate_proj"), dotted tails ("self_attn.q_proj"), or a preset
      name from ``lora.TARGET_PRESETS`` ("mlp", "attention", "all"). ``lm_head`` is only wrapped
      when named. Every target must match at least one layer.
    * Layers already wrapped are left as they are (a second call wraps nothing twice); asking for
      a different configuration on an already wrapped layer is an error.
    * With ``freeze=True`` (default) every parameter except the LoRA matrices is frozen, embeddings
      and norms included.
    The other keywords go to ``Qlora_4_bit`` (``compute_dtype=None``: the device helper's dtype;
    ``double_quant`` defaults to True, and False keeps the block scales in float32; ``compress_statistics``
    is bitsandbytes' name for it; ``quant_type="int8"`` for an 8-bit LLM.int8 base; ``use_dora=True`` for DoRA).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    check_rank_alpha(r, alpha)
    check_quant_settings(quant_type, blocksize, "quantize_model")
    given_double_quant = double_quant if compress_statistics is None else compress_statistics
    check_variant_settings(quant_type, blocksize, compute_dtype, use_dora, require_lora, "quantize_model",
                           bool(use_qlora), given_double_quant, rslora)
    four_bit = use_qlora and quant_type != "int8"  # the only base with block scales to double-quantize
    double_quant = resolve_double_quant(double_quant, compress_statistics, "quantize_model") if four_bit else None
    targets = resolve_target_names(mlp_layers)
    _check_not_prequantized(module)
    settings = dict(alpha=alpha, r=r, require_lora=bool(require_lora), use_qlora=bool(use_qlora), rslora=rslora,
                    quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
                    compute_dtype=compute_dtype, use_dora=bool(use_dora))

    # Who shares a parameter with whom (tied embeddings: lm_head.weight is embed_tokens.weight).
    owners: dict[int, int] = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1

    # 1. Check every target (names, types, sharing, sizes, dtypes, values) before changing anything.
    matched = {t: [] for t in targets}
    to_wrap = []
    for parent, name, qualified, child in _walk(module):
        hits = [t for t in targets if target_matches(qualified, t)]
        if not hits:
            continue
        for t in hits:
            matched[t].append(qualified)
        if isinstance(child, Qlora_4_bit):
            _check_same_config(child, qualified, settings)
            continue
        if not isinstance(child, nn.Linear):
            inner = linear_names(child)
            hint = f"; name its linear layers instead: {', '.join(inner)}" if inner else ""
            raise TypeError(f"target {hits[0]!r} matches {qualified}, a {type(child).__name__}, not an nn.Linear{hint}")
        if owners.get(id(child.weight), 0) > 1:
            raise ValueError(f"{qualified}.weight is shared with another layer (tied embeddings); wrapping it "
                             "would untie them. Leave it out of mlp_layers (LoRA rarely targets lm_head).")
        check_features(child.in_features, child.out_features, qualified)
        check_weight_to_wrap(child, qualified, bool(use_qlora), quant_type)
        to_wrap.append((parent, name, qualified, child))

    missing = [t for t, hits in matched.items() if not hits]
    if missing:
        raise ValueError(f"no layer of the model matches {missing}; the linear layers it has are named: "
                         f"{', '.join(linear_names(module))}")

    # 2. Build every new layer, then 3. swap them in and freeze; undone as a whole if anything fails.
    with unchanged_on_error(module):
        built = [(parent, name, Qlora_4_bit.from_linear(
            child, alpha, r, require_lora, use_qlora, rslora=rslora, double_quant=double_quant,
            compute_dtype=compute_dtype, quant_type=quant_type, blocksize=blocksize, use_dora=use_dora,
            name=qualified))
            for parent, name, qualified, child in to_wrap]
        for (parent, name, layer), (_, _, _, child) in zip(built, to_wrap):
            layer.train(child.training)  # a model in eval mode gets layers in eval mode
            setattr(parent, name, layer)
        if freeze:
            freeze_non_lora(module)
        guard_save_pretrained(module)
    return module


def _check_same_config(layer: Qlora_4_bit, qualified, settings: dict) -> None:
    """A second quantize_model call may not ask for other settings on a layer it wrapped before."""
    have = layer.settings()
    want = {k: settings[k] for k in have}
    if want.get("compute_dtype") is None:  # None asks for no particular compute dtype
        want.pop("compute_dtype", None)
    differ = {k: (have[k], v) for k, v in want.items() if have[k] != v}
    if differ:
        detail = ", ".join(f"{k}={new!r} (it has {old!r})" for k, (old, new) in differ.items())
        raise ValueError(f"{qualified} is already a Qlora_4_bit and this call asks for {detail}; a layer is wrapped "
                         "once. Call quantize_model with the settings it was wrapped with, or start from a fresh "
                         "model to change them.")


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The trained parameters of every Qlora_4_bit layer in ``module``: W_a, W_b (and DoRA's magnitude)."""
    return [p for m in module.modules() if isinstance(m, Qlora_4_bit) and m.require_lora
            for p in (m.W_a, m.W_b, m.magnitude) if p is not None]


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

"""PEFT's adapter format, both ways: ``export_peft`` writes what ``peft.PeftModel.from_pretrained``
loads, ``import_peft`` loads a PEFT LoRA adapter from anywhere into our layers.

PEFT stores the same matrices as ours, transposed: ``lora_A.weight = W_a.T`` (r, in),
``lora_B.weight = W_b.T`` (out, r), under keys prefixed with ``base_model.model.``, in
``adapter_model.safetensors`` beside ``adapter_config.json``. Every config field we cannot honour is
an error naming the field.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..layer import Qlora_4_bit
from ..lora import target_matches as matches
from ..quantize import linear_layers, quantize_model, unchanged_on_error
from .folder import cpu_copy, read_folder, write_folder
from .ours import _check_magnitude, _check_pair, _list, _shared_setting, base_model_id, lora_layers

PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


def _peft_targets(model: nn.Module, layers: dict[str, Qlora_4_bit]) -> list[str]:
    """Short names ("gate_proj") when they pick out exactly the wrapped layers, else the full names."""
    short = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in layers))
    hits = [q for q, _ in linear_layers(model) if any(matches(q, s) for s in short)]
    return short if set(hits) == set(layers) else list(layers)


def export_peft(model: nn.Module, path, task_type: str = "CAUSAL_LM") -> Path:
    """Write the adapter as PEFT does (``adapter_config.json`` + ``adapter_model.safetensors``); return the folder.

    ``peft.PeftModel.from_pretrained(plain_base_model, path)`` then gives the same outputs as our
    model in LoRA mode (a QLoRA-trained adapter on the unquantized base).
    """
    layers = lora_layers(model)
    r, alpha = _shared_setting(layers, "r"), _shared_setting(layers, "alpha")
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = cpu_copy(layer.W_a.T)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = cpu_copy(layer.W_b.T)
        if layer.use_dora:  # PEFT saves DoRA's magnitude under this key, without ".weight"
            tensors[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = cpu_copy(layer.magnitude)
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_id(model),
        "r": r, "lora_alpha": alpha, "use_rslora": _shared_setting(layers, "rslora"),
        "target_modules": _peft_targets(model, layers), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_dora": _shared_setting(layers, "use_dora"), "init_lora_weights": True,
        "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
    }
    return write_folder(path, PEFT_CONFIG_FILE, config, PEFT_WEIGHTS_FILE, tensors)


# Fields import_peft reads, and fields that do not change what the loaded adapter computes.
PEFT_USED = {"peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "target_modules", "layers_to_transform",
             "layers_pattern", "exclude_modules"}
PEFT_IRRELEVANT = {"task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
                   "auto_mapping", "lora_dropout",  # dropout acts only while training, not on the weights
                   "megatron_core", "qalora_group_size", "ensure_weight_tying", "init_lora_weights",
                   "eva_config"}  # EVA only chose the initial A (and a rank_pattern, which is checked)
# init_lora_weights values whose saved weights are a plain adapter on the unchanged base model
# (PiSSA, OLoRA, CorDA, LoftQ change the base weights themselves unless converted first; MiCA is a
# LoRA variant). Anything not known to be plain is refused.
PEFT_PLAIN_INITS = (True, False, "gaussian", "eva")
PEFT_REASONS = {
    "rank_pattern": "per-layer ranks are not supported (one r for all layers)",
    "alpha_pattern": "per-layer alphas are not supported (one alpha for all layers)",
    "fan_in_fan_out": "it stores weights transposed for Conv1D (GPT-2 style) layers; Qlora_4_bit wraps nn.Linear",
    "bias": "trained biases are not supported (only bias='none')",
    "lora_bias": "a bias on lora_B is not supported",
    "modules_to_save": "fully trained extra modules are not part of a LoRA adapter here",
    "trainable_token_indices": "trained embedding rows are not supported",
    "target_parameters": "LoRA on raw parameters (not nn.Linear layers) is not supported",
    "use_qalora": "QA-LoRA's pooled inputs are not supported",
    "layer_replication": "layer replication changes the model's structure",
}


def _neutral(value) -> bool:
    return value is None or value is False or value == {} or value == [] or value == "none"


def check_peft_config(config: dict) -> None:
    """Raise a ValueError naming the first PEFT config field that ``import_peft`` cannot honour."""
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{PEFT_CONFIG_FILE}: peft_type is {config.get('peft_type')!r}; only 'LORA' adapters can be imported")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise ValueError(f"{PEFT_CONFIG_FILE} lacks the field {key!r}")
    init = config.get("init_lora_weights", True)
    if init not in PEFT_PLAIN_INITS:
        raise ValueError(f"{PEFT_CONFIG_FILE}: init_lora_weights={init!r} is not supported: that initialisation "
                         "changes the base weights too; convert the adapter to a plain LoRA first (PEFT's "
                         "path_initial_model_for_weight_conversion)")
    for key, value in config.items():
        if key in PEFT_USED or key in PEFT_IRRELEVANT or _neutral(value):
            continue
        if key == "loftq_config" and value == {}:
            continue
        reason = PEFT_REASONS.get(key, "import_peft does not know how to honour it")
        raise ValueError(f"{PEFT_CONFIG_FILE}: field {key}={value!r} cannot be honoured: {reason}")


def _peft_targeted(model: nn.Module, target_modules) -> set[str]:
    """The linear layers PEFT's ``target_modules`` picks out (list: name or dotted tail; str: full regex)."""
    names = [q for q, _ in linear_layers(model)]
    if isinstance(target_modules, str):
        return {q for q in names if re.fullmatch(target_modules, q)}
    return {q for q in names if any(matches(q, t) for t in target_modules)}


_PEFT_KEY = re.compile(r"^" + re.escape(PEFT_PREFIX) + r"(.+)\.(?:lora_([AB])\.weight|lora_magnitude_vector)$")


def import_peft(model: nn.Module, path, use_qlora: bool = False, **quantize_kwargs) -> nn.Module:
    """Wrap ``model``'s adapter targets with ``quantize_model`` and load a PEFT LoRA adapter into them.

    ``model`` is the plain base model (or one already wrapped with the same settings). The layers to
    wrap are the ones the weight file holds, checked against ``target_modules``; ``use_rslora`` is
    honoured, and so is ``use_dora`` (the magnitudes load into ``Qlora_4_bit(use_dora=True)``); fields
    we cannot honour (rank/alpha patterns, ``fan_in_fan_out``, bias, ...) raise an error naming the field.
    Extra keywords go to ``quantize_model`` (with ``use_qlora=True``, e.g. ``compute_dtype`` or
    ``quant_type``: the base the adapter runs on).
    """
    config, tensors = read_folder(path, PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, what="PEFT adapter folder",
                                  hint="import_peft reads safetensors only, never adapter_model.bin.")
    check_peft_config(config)
    r, alpha, rslora = config["r"], config["lora_alpha"], bool(config.get("use_rslora", False))
    dora = bool(config.get("use_dora", False))

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unexpected = []
    for key, value in tensors.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            unexpected.append(key)
        else:
            pairs.setdefault(m.group(1), {})[m.group(2) or "m"] = value
    if unexpected:
        raise ValueError(f"{PEFT_WEIGHTS_FILE} holds keys that are not plain LoRA matrices: {_list(unexpected)}; "
                         f"expected only '{PEFT_PREFIX}<layer>.lora_A.weight' and '.lora_B.weight'")
    if not pairs:
        raise ValueError(f"{PEFT_WEIGHTS_FILE} holds no LoRA matrices")
    half = [f"{n} (lora_{'B' if 'A' in p else 'A'} missing)" for n, p in pairs.items() if not {"A", "B"} <= p.keys()]
    if half:
        raise ValueError(f"{PEFT_WEIGHTS_FILE} has unpaired LoRA matrices: {_list(half)}")
    wrong = [n for n, p in pairs.items() if ("m" in p) != dora]
    if wrong:
        raise ValueError(f"{PEFT_WEIGHTS_FILE}: use_dora={dora} in {PEFT_CONFIG_FILE}, but these layers "
                         f"{'lack' if dora else 'have'} a lora_magnitude_vector: {_list(wrong)}")

    if all(config.get(k) is None for k in ("layers_to_transform", "layers_pattern", "exclude_modules")):
        targeted = _peft_targeted(model, config["target_modules"])
        if targeted != set(pairs):
            parts = []
            if targeted - set(pairs):
                parts.append(f"targeted but without weights: {_list(targeted - set(pairs))}")
            if set(pairs) - targeted:
                parts.append(f"weights for layers not targeted or not in this model: {_list(set(pairs) - targeted)}")
            raise ValueError(f"target_modules={config['target_modules']!r} and {PEFT_WEIGHTS_FILE} disagree on this "
                             "model (" + "; ".join(parts) + "); is it the adapter's base model?")

    for name, p in pairs.items():
        A, B = p["A"], p["B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != r or B.shape[1] != r:
            raise ValueError(f"{name}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not have the config's "
                             f"rank r={r} (rank_pattern is not supported)")
    # Wrapping comes first (the shape checks need the layers); any failure unwraps the model again.
    with unchanged_on_error(model):
        quantize_model(model, list(pairs), alpha, r, use_qlora=use_qlora, rslora=rslora, use_dora=dora,
                       **quantize_kwargs)
        modules = dict(model.named_modules())
        for name, p in pairs.items():
            _check_pair(name, modules[name], p["A"].T, p["B"].T)
            if dora:
                _check_magnitude(name, modules[name], p["m"])
    with torch.no_grad():
        for name, p in pairs.items():
            modules[name].W_a.copy_(p["A"].T)
            modules[name].W_b.copy_(p["B"].T)
            if dora:
                modules[name].magnitude.copy_(p["m"])
    return model

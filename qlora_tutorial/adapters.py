"""Keep, share and fold in what fine-tuning learned: the LoRA matrices, nothing else.

A fine-tuned ``Qlora_4_bit`` model differs from its base only in the ``W_a``/``W_b`` pairs, so that is
all we store. Three ways out of the model and one way into it:

* ``save_adapter(model, folder)`` / ``load_adapter(model, folder)``: our own format, two files:
  ``adapter.safetensors`` (the tensors, named ``<layer>.W_a`` / ``<layer>.W_b``) and ``adapter.json``
  (r, alpha, rsLoRA, mode, the wrapped layers, the base model's id). A DoRA adapter also stores
  each layer's magnitude (``<layer>.magnitude``), and its config says ``"use_dora": true``.
  safetensors holds raw tensor bytes and a JSON header, never pickled Python objects, so loading a file runs no code from it.
  The round trip is bit-exact, and loading checks every key and shape: nothing is left at its
  initial value without an error.
* ``export_peft(model, folder)``: PEFT's own layout (``adapter_config.json`` +
  ``adapter_model.safetensors``) so that ``peft.PeftModel.from_pretrained(base, folder)`` runs the
  adapter on the plain base model. PEFT stores the same matrices transposed:
  ``lora_A.weight = W_a.T`` (r, in), ``lora_B.weight = W_b.T`` (out, r), under keys prefixed with
  ``base_model.model.``.
* ``import_peft(model, folder, use_qlora=...)``: the other direction, for a PEFT LoRA adapter from
  anywhere; every config field we cannot honour is an error naming the field.
* ``merge(model)``: fold ``W0 + s * (W_a @ W_b)^T`` into a plain layer. Exact (up to float rounding)
  when the base is kept in 16/32 bits; with ``requantize=True`` the merged weight is rounded to NF4
  again, and ``merge_errors`` measures what that rounding costs.

And for the whole quantized model (base included), ``save_quantized(model, folder)`` /
``load_quantized(model_or_config, folder)``: the full state dict in safetensors, 4-bit layers as
bitsandbytes stores them, read back bit-exact. ``model.state_dict()`` / ``load_state_dict(strict=True)``
round-trip too. transformers' ``save_pretrained`` refuses a wrapped model (``from_pretrained`` would
re-initialise the layers it does not know); it works again after ``merge``.

Every loader checks what it loads before it copies anything, and a failed call leaves the model as
it was (``model.unchanged_on_error``).
"""
from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .layer import Qlora_4_bit, dequantize_base
from .lora import lora_scale
from .lora import target_matches as matches
from .nf4 import unpack_4bit
from .quantize import (guard_save_pretrained, layer_settings, linear_layers, name_list, quantize_model,
                       unchanged_on_error, wrapped_layers)

FORMAT = "qlora_tutorial.adapter"
FORMAT_VERSION = 1
WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


# ---------------------------------------------------------------- what the model holds
def lora_layers(model: nn.Module) -> dict[str, Qlora_4_bit]:
    """The model's ``Qlora_4_bit`` layers that carry LoRA matrices, by qualified name, in model order."""
    modules = dict(model.named_modules())
    layers = {name: modules[name] for name in wrapped_layers(model) if modules[name].require_lora}
    if not layers:
        raise ValueError("the model has no LoRA layers: wrap it with quantize_model(model, targets, alpha, r) "
                         "(require_lora=True) before saving or merging an adapter")
    return layers


def _shared_setting(layers: dict[str, Qlora_4_bit], attribute: str):
    values = {getattr(layer, attribute) for layer in layers.values()}
    if len(values) != 1:
        raise ValueError(f"the LoRA layers do not share one {attribute} ({sorted(values)}); an adapter file "
                         "holds one setting for all layers. Wrap all layers with the same quantize_model call.")
    return values.pop()


def base_model_id(model: nn.Module) -> str | None:
    """The id of the model the adapter belongs to: its hub id, never a local path.

    The offline SmolLM2 folder records its hub id in PROVENANCE.json; other local folders give
    their folder name.
    """
    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    if not name:
        return None
    folder = Path(name)
    if folder.is_dir():
        provenance = folder / "PROVENANCE.json"
        if provenance.is_file():
            hub_id = json.loads(provenance.read_text()).get("hub_id")
            if hub_id:
                return hub_id
        return folder.name
    return name


def adapter_config(model: nn.Module) -> dict:
    """The JSON config ``save_adapter`` writes: what is needed to rebuild the layers the weights fit."""
    layers = lora_layers(model)
    use_qlora = _shared_setting(layers, "use_qlora")
    dora = {"use_dora": True} if _shared_setting(layers, "use_dora") else {}
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "base_model": base_model_id(model),
        "mode": "qlora" if use_qlora else "lora",
        "r": _shared_setting(layers, "r"),
        "alpha": _shared_setting(layers, "alpha"),
        "rslora": _shared_setting(layers, "rslora"),
        "targets": list(layers),
        **dora,
    }


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<layer>.W_a": (in, r), "<layer>.W_b": (r, out)} (and DoRA's "<layer>.magnitude": (out,)) as
    detached contiguous CPU copies."""
    tensors = {}
    for name, layer in lora_layers(model).items():
        for key, shape in adapter_shapes(name, layer).items():
            tensors[key] = getattr(layer, key.rsplit(".", 1)[1]).detach().to("cpu", copy=True).contiguous()
    return tensors


def adapter_shapes(name: str, layer: Qlora_4_bit) -> dict[str, tuple]:
    """The adapter tensors one layer owns, with their shapes: W_a, W_b, and DoRA's magnitude."""
    shapes = {f"{name}.W_a": (layer.in_features, layer.r), f"{name}.W_b": (layer.r, layer.out_features)}
    if layer.use_dora:
        shapes[f"{name}.magnitude"] = (layer.out_features,)
    return shapes


# ---------------------------------------------------------------- our format
def save_adapter(model: nn.Module, path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the model's LoRA matrices and their config into the folder ``path``; return the folder.

    Two files: ``adapter.safetensors`` (only the W_a/W_b tensors, float32 as trained) and
    ``adapter.json``. The frozen base is not stored: it is the base model itself.
    ``tensors``: the matrices to write instead of the model's own, e.g. gathered from the shards
    of an FSDP-sharded model (``qlora_tutorial.fsdp.gather_adapter``); they must be exactly the
    model's ``<layer>.W_a`` / ``<layer>.W_b``, in their shapes.
    """
    config = adapter_config(model)
    if tensors is None:
        tensors = adapter_tensors(model)
    else:
        _check_given_tensors(model, tensors)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def _check_given_tensors(model: nn.Module, tensors: dict) -> None:
    layers = lora_layers(model)
    expected = {k: v for n, layer in layers.items() for k, v in adapter_shapes(n, layer).items()}
    missing, unexpected = expected.keys() - tensors.keys(), tensors.keys() - expected.keys()
    if missing or unexpected:
        raise ValueError(f"tensors must hold exactly the model's LoRA matrices; missing: {_list(missing) or 'none'}; "
                         f"not in the model: {_list(unexpected) or 'none'}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"tensors[{key!r}] has shape {tuple(tensors[key].shape)}, the model's is {shape}")


def read_adapter(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) from a folder written by ``save_adapter``, checked to be that format."""
    folder = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            peft_hint = (" It holds a PEFT adapter: use import_peft." if (folder / PEFT_CONFIG_FILE).is_file() else "")
            raise FileNotFoundError(f"{name} is missing in the adapter folder {folder.name!r}; "
                                    f"save_adapter writes {CONFIG_FILE} and {WEIGHTS_FILE}.{peft_hint}")
    config = json.loads((folder / CONFIG_FILE).read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{CONFIG_FILE} is not a {FORMAT} config (format={config.get('format')!r})")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"adapter format version {config.get('format_version')!r} is not supported "
                         f"(this package reads version {FORMAT_VERSION})")
    for key in ("r", "alpha", "rslora", "mode", "targets"):
        if key not in config:
            raise ValueError(f"{CONFIG_FILE} lacks the field {key!r}")
    if config["mode"] not in ("qlora", "lora"):
        raise ValueError(f"{CONFIG_FILE}: mode must be 'qlora' or 'lora', got {config['mode']!r}")
    return config, load_file(str(folder / WEIGHTS_FILE))


def _list(names, limit: int = 4) -> str:
    return name_list(sorted(names), limit)


def load_adapter(model: nn.Module, path, use_qlora: bool | None = None) -> nn.Module:
    """Load an adapter saved by ``save_adapter`` into ``model``; return the model.

    A plain model (no ``Qlora_4_bit`` layers yet) is first wrapped as the config says: the same
    targets, r, alpha and rsLoRA, in the saved mode (``use_qlora=None``) or the one asked for. A model
    already wrapped must have exactly the saved layers, with the same rank and scale. Missing or
    unexpected tensors, another rank, another shape or another scale raise an error, so no LoRA
    matrix is ever left at its initial value by accident.
    """
    config, tensors = read_adapter(path)
    if use_qlora is None:
        use_qlora = config["mode"] == "qlora"
    # Wrapping comes first (the checks need the layers); any failure below unwraps the model again.
    with unchanged_on_error(model):
        if not wrapped_layers(model):
            quantize_model(model, config["targets"], config["alpha"], config["r"], use_qlora=use_qlora,
                           rslora=config["rslora"], use_dora=config.get("use_dora", False))
        _check_adapter_fits(model, config, tensors)
    layers = lora_layers(model)
    with torch.no_grad():
        for name, layer in layers.items():
            for key in adapter_shapes(name, layer):
                getattr(layer, key.rsplit(".", 1)[1]).copy_(tensors[key])
    return model


def _check_adapter_fits(model: nn.Module, config: dict, tensors: dict) -> None:
    """Every key, shape, value and the scale of an adapter file against the model's LoRA layers."""
    layers = lora_layers(model)
    saved_base, our_base = config.get("base_model"), base_model_id(model)
    if saved_base and our_base and saved_base != our_base:
        warnings.warn(f"the adapter was trained on {saved_base!r} but is loaded into {our_base!r}; the shapes fit, "
                      "but the result is only meaningful on the same base weights", stacklevel=2)

    saved_dora, model_dora = bool(config.get("use_dora", False)), any(l.use_dora for l in layers.values())
    if saved_dora != model_dora:
        raise ValueError(f"the adapter has use_dora={saved_dora} (a DoRA adapter holds magnitudes) but the model's "
                         f"layers are wrapped with use_dora={model_dora}; wrap the model as the adapter was trained, "
                         "or load it into a plain model")
    expected = {k for n, layer in layers.items() for k in adapter_shapes(n, layer)}
    missing, unexpected = expected - tensors.keys(), tensors.keys() - expected
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing from the file: {_list(missing)}")
        if unexpected:
            parts.append(f"in the file but not in the model: {_list(unexpected)}")
        raise ValueError("the adapter does not fit the model's LoRA layers (" + "; ".join(parts) + "). Wrap the "
                         f"same layers as when it was saved (targets in {CONFIG_FILE}), or load it into a plain model.")

    file_scale = lora_scale(config["alpha"], config["r"], config["rslora"])
    for name, layer in layers.items():
        W_a, W_b = tensors[f"{name}.W_a"], tensors[f"{name}.W_b"]
        _check_pair(name, layer, W_a, W_b)
        if layer.use_dora:
            _check_magnitude(name, layer, tensors[f"{name}.magnitude"])
        if not math.isclose(layer.scale, file_scale, rel_tol=1e-12):
            raise ValueError(f"{name} has scale {layer.scale:g} but the adapter was trained with scale {file_scale:g} "
                             f"(alpha={config['alpha']}, r={config['r']}, rslora={config['rslora']}); "
                             "wrap the model with the adapter's alpha and rslora")


def _check_magnitude(name: str, layer: Qlora_4_bit, m: torch.Tensor) -> None:
    """DoRA's magnitude must be a finite (out,) vector."""
    if tuple(m.shape) != (layer.out_features,) or not m.is_floating_point() or not torch.isfinite(m).all():
        raise ValueError(f"{name}: DoRA's magnitude must be a finite floating-point vector of {layer.out_features} "
                         f"values (one per output feature), got {m.dtype} {tuple(m.shape)}")


def _check_pair(name: str, layer: Qlora_4_bit, W_a: torch.Tensor, W_b: torch.Tensor) -> None:
    """W_a must be (in, r) and W_b (r, out) of this layer; say which number differs."""
    if W_a.ndim != 2 or W_b.ndim != 2:
        raise ValueError(f"{name}: W_a and W_b must be matrices, got shapes {tuple(W_a.shape)} and {tuple(W_b.shape)}")
    file_r = W_a.shape[1]
    if file_r != layer.r or W_b.shape[0] != layer.r:
        raise ValueError(f"{name}: the adapter has rank {file_r} (W_a {tuple(W_a.shape)}, W_b {tuple(W_b.shape)}) "
                         f"but the layer has rank r={layer.r}; wrap the model with r={file_r}")
    if W_a.shape[0] != layer.in_features or W_b.shape[1] != layer.out_features:
        raise ValueError(f"{name}: the adapter is for a {W_a.shape[0]} -> {W_b.shape[1]} layer but the model's is "
                         f"{layer.in_features} -> {layer.out_features}: another base model?")
    if not (W_a.is_floating_point() and W_b.is_floating_point()):
        raise ValueError(f"{name}: adapter tensors must be floating point, got {W_a.dtype} and {W_b.dtype}")
    if not (torch.isfinite(W_a).all() and torch.isfinite(W_b).all()):
        raise ValueError(f"{name}: the adapter holds NaN or inf values")


# ---------------------------------------------------------------- PEFT's format
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
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.W_a.detach().T.to("cpu", copy=True).contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.W_b.detach().T.to("cpu", copy=True).contiguous()
        if layer.use_dora:  # PEFT saves DoRA's magnitude under this key, without ".weight"
            tensors[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = layer.magnitude.detach().to("cpu", copy=True)
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_id(model),
        "r": r, "lora_alpha": alpha, "use_rslora": _shared_setting(layers, "rslora"),
        "target_modules": _peft_targets(model, layers), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_dora": _shared_setting(layers, "use_dora"), "init_lora_weights": True,
        "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
    }
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / PEFT_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


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
    we cannot honour (rank/alpha patterns, ``fan_in_fan_out``, bias, ...) raise an error naming the field. Extra keywords go to ``quantize_model`` (e.g. ``compute_dtype``).
    """
    folder = Path(path)
    for name in (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{name} is missing in the PEFT adapter folder {folder.name!r} "
                                    "(import_peft reads safetensors only, never adapter_model.bin)")
    config = json.loads((folder / PEFT_CONFIG_FILE).read_text())
    check_peft_config(config)
    r, alpha, rslora = config["r"], config["lora_alpha"], bool(config.get("use_rslora", False))
    dora = bool(config.get("use_dora", False))
    tensors = load_file(str(folder / PEFT_WEIGHTS_FILE))

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


# ---------------------------------------------------------------- merging
def _parent(model: nn.Module, name: str):
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def base_dtype(layer: Qlora_4_bit) -> torch.dtype:
    """The dtype the layer's base weight had before it was wrapped (and that merging returns to)."""
    if layer.is_int8:
        return layer.source_dtype
    if layer.use_qlora and getattr(layer.quant_nn.weight, "quant_state", None) is not None:
        return layer.quant_nn.weight.quant_state.dtype
    return layer.quant_nn.weight.dtype


def merged_linear(layer: Qlora_4_bit, dtype: torch.dtype | None = None) -> nn.Linear:
    """A frozen ``nn.Linear`` holding the layer's effective weight ``W0 + s * (W_a @ W_b)^T`` (and its bias).

    The sum is formed in float32 and stored in ``dtype`` (default: the base's original dtype).
    """
    dtype = dtype or base_dtype(layer)
    weight = layer.merged_weight()
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                       device=weight.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.to(dtype))
        if layer.bias is not None:
            linear.bias.copy_(layer.bias.detach().to(dtype))
    linear.requires_grad_(False)
    return linear


def merge(model: nn.Module, requantize: bool = False, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold every LoRA layer's update into its base and drop the adapter; return the model.

    * ``requantize=False``: each layer becomes a plain ``nn.Linear`` with ``W0 + s * (W_a @ W_b)^T`` in
      ``dtype`` (default: the base's original dtype). Exact up to the rounding of that dtype; a
      QLoRA base contributes its dequantized NF4 weight, the one it trained against.
    * ``requantize=True``: the merged weight is quantized to 4 bits again (a ``Qlora_4_bit`` with
      ``require_lora=False``, same quant type and blocksize): a 4-bit model with no adapter, at the
      price of a new rounding error that ``merge_errors`` measures.
    """
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    layers = lora_layers(model)
    # Build every merged layer first (this is where anything can fail), then swap them all in.
    merged = {}
    for name, layer in layers.items():
        linear = merged_linear(layer, dtype)
        if requantize:
            kwargs = {}
            if layer.is_int8:
                kwargs = dict(quant_type="int8")
            elif layer.use_qlora:
                w = layer.quant_nn.weight
                kwargs = dict(quant_type=w.quant_type, blocksize=w.blocksize,
                              compress_statistics=w.compress_statistics, compute_dtype=layer.quant_nn.compute_dtype)
            merged[name] = Qlora_4_bit.from_linear(linear, layer.alpha, layer.r, require_lora=False,
                                                   use_qlora=True, name=name, **kwargs)
        else:
            merged[name] = linear
    with unchanged_on_error(model):
        for name, new in merged.items():
            parent, attr = _parent(model, name)
            setattr(parent, attr, new)
        guard_save_pretrained(model)  # a model of plain layers can be saved with save_pretrained again
    return model


@torch.no_grad()
def merge_errors(model: nn.Module, dtypes=(torch.float16, torch.bfloat16)) -> list[dict]:
    """How far each way of merging lands from the weight the adapted layer really computes with.

    For every LoRA layer: ``delta`` = ||s (W_a W_b)^T||_F (the adapter's update), and for each way of
    storing the merged weight W = W0 + update (each dtype in ``dtypes``, and "nf4": quantized again with
    the layer's quant type and blocksize) the Frobenius norm and max abs of the error, and the error
    relative to the update (1.0 = an error as large as everything the adapter changed). For a QLoRA
    layer also ``codes_changed``: the share of its 4-bit codes that requantizing would change.
    """
    import bitsandbytes.functional as bnbF

    rows = []
    for name, layer in lora_layers(model).items():
        exact = layer.merged_weight()
        delta = layer.delta_weight().norm().item()
        row = {"layer": name, "delta": delta}
        stored = {str(d).replace("torch.", ""): exact.to(d).float() for d in dtypes}
        w = layer.quant_nn.weight
        quant_type = getattr(w, "quant_type", "nf4")
        blocksize = getattr(w, "blocksize", 64)
        packed, state = bnbF.quantize_4bit(exact.contiguous(), blocksize=blocksize, quant_type=quant_type)
        stored[quant_type] = dequantize_base(packed, state).float()
        if layer.is_quantized:
            # Which 4-bit codes the requantized weight changes (two codes per byte: high, low nibble).
            row["codes_changed"] = (unpack_4bit(packed, 2 * packed.numel()) != unpack_4bit(w.data, 2 * w.data.numel())
                                    ).float().mean().item()
        for key, approx in stored.items():
            err = approx - exact
            row[f"{key}_error"] = err.norm().item()
            row[f"{key}_max_abs"] = err.abs().max().item()
            row[f"{key}_relative_to_delta"] = err.norm().item() / delta if delta > 0 else math.inf
        rows.append(row)
    return rows


# ---------------------------------------------------------------- the whole quantized model
QUANTIZED_FORMAT = "qlora_tutorial.quantized"
QUANTIZED_WEIGHTS_FILE = "quantized.safetensors"
QUANTIZED_CONFIG_FILE = "quantized.json"


def save_quantized(model: nn.Module, path) -> Path:
    """Write a whole model with ``Qlora_4_bit`` layers into the folder ``path``; return the folder.

    Two files: ``quantized.safetensors`` holds the full state dict (the 4-bit layers as bitsandbytes
    stores them: packed bytes, block scales, code, and the double quantization's constants; LoRA
    matrices; every other weight), ``quantized.json`` how each layer was wrapped.
    ``load_quantized`` reads it back bit-exact. Tied weights are stored once.
    """
    layers = {name: layer_settings(model.get_submodule(name)) for name in wrapped_layers(model)}
    if not layers:
        raise ValueError("the model has no Qlora_4_bit layers: save a plain model with save_pretrained "
                         "(transformers) or safetensors.torch.save_model")
    for settings in layers.values():
        settings.pop("compute_dtype", None)  # a choice for the device it runs on, not part of the weights
    tensors, aliases, storages = {}, {}, {}
    for key, value in model.state_dict().items():
        value = value.detach()
        place = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.dtype)
        if value.numel() and place in storages:  # the same tensor under a second name (tied weights)
            aliases[key] = storages[place]
            continue
        shared = value.numel() and any(p[0] == place[0] for p in storages)
        storages[place] = key
        # safetensors stores no two names on one memory block: copy the tensors that share one
        tensors[key] = (value.clone() if shared else value).to("cpu").contiguous()
    config = {"format": QUANTIZED_FORMAT, "format_version": FORMAT_VERSION, "base_model": base_model_id(model),
              "model_class": type(model).__name__, "layers": layers, "aliases": aliases}
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / QUANTIZED_WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / QUANTIZED_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def read_quantized(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, state dict) from a folder written by ``save_quantized``; tied names filled in."""
    folder = Path(path)
    for name in (QUANTIZED_CONFIG_FILE, QUANTIZED_WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{name} is missing in the folder {folder.name!r}; save_quantized writes "
                                    f"{QUANTIZED_CONFIG_FILE} and {QUANTIZED_WEIGHTS_FILE}")
    config = json.loads((folder / QUANTIZED_CONFIG_FILE).read_text())
    if config.get("format") != QUANTIZED_FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{QUANTIZED_CONFIG_FILE} is not a {QUANTIZED_FORMAT} version {FORMAT_VERSION} config "
                         f"(format={config.get('format')!r}, version={config.get('format_version')!r})")
    tensors = load_file(str(folder / QUANTIZED_WEIGHTS_FILE))
    for alias, key in config.get("aliases", {}).items():
        tensors[alias] = tensors[key]
    return config, tensors


def load_quantized(model_or_config, path) -> nn.Module:
    """A model saved by ``save_quantized``, back bit-exact; returns the model.

    ``model_or_config`` is a model of the same architecture, plain (it is wrapped as the file says,
    e.g. ``load_model()`` or ``AutoModelForCausalLM.from_config(config)``) or already wrapped with
    the same settings; or a transformers config, from which a model is built first. Every key and
    shape is checked before anything is loaded; on any error the model is left as it was.
    """
    config, tensors = read_quantized(path)
    model = model_or_config
    if not isinstance(model, nn.Module):
        from transformers import AutoModelForCausalLM, PretrainedConfig

        if not isinstance(model, PretrainedConfig):
            raise TypeError(f"model_or_config must be a torch.nn.Module or a transformers config, "
                            f"got {type(model).__name__}")
        model = AutoModelForCausalLM.from_config(model)
    with unchanged_on_error(model):
        groups: dict[str, list[str]] = {}
        for name, settings in config["layers"].items():
            groups.setdefault(json.dumps(settings, sort_keys=True), []).append(name)
        for key, names in groups.items():
            settings = json.loads(key)
            alpha, r = settings.pop("alpha"), settings.pop("r")
            quantize_model(model, names, alpha, r, **settings)
        extra = set(wrapped_layers(model)) - set(config["layers"])
        if extra:
            raise ValueError(f"the model has Qlora_4_bit layers the file does not hold: {_list(extra)}; "
                             "load into a plain model")
        _check_state_fits(model.state_dict(), tensors)
        model.load_state_dict(tensors, strict=True)
    return model


def _check_state_fits(expected: dict, tensors: dict) -> None:
    missing, unexpected = expected.keys() - tensors.keys(), tensors.keys() - expected.keys()
    if missing or unexpected:
        parts = ([f"missing from the file: {_list(missing)}"] if missing else []) + (
            [f"in the file but not in the model: {_list(unexpected)}"] if unexpected else [])
        raise ValueError("the saved model does not fit this model (" + "; ".join(parts) + "); load it into a "
                         "model of the architecture it was saved from")
    # (bitsandbytes' packed quant_state entry is JSON text whose length varies: no fixed shape)
    wrong = [f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if ".quant_state.bitsandbytes__" not in k and tuple(tensors[k].shape) != tuple(v.shape)]
    if wrong:
        raise ValueError(f"shapes differ between the file and the model: {_list(wrong, 3)}; another model size?")

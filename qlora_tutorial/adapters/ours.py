"""Our adapter format: the LoRA matrices of a fine-tuned model, nothing else.

A fine-tuned ``Qlora_4_bit`` model differs from its base only in the ``W_a``/``W_b`` pairs, so that
is all ``save_adapter`` stores, in two files: ``adapter.safetensors`` (the tensors, named
``<layer>.W_a`` / ``<layer>.W_b``, and for DoRA ``<layer>.magnitude``) and ``adapter.json`` (r,
alpha, rsLoRA, mode, the frozen base's kind and settings, the wrapped layers, the base model's id, and
``"use_dora": true`` for DoRA).
The round trip is bit-exact, and ``load_adapter`` checks every key, shape and value before it copies
anything: nothing is left at its initial value without an error, and a failed call leaves the model
as it was.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
from torch import nn

from ..layer import Qlora_4_bit
from ..lora import lora_scale
from ..quantize import name_list, quantize_model, unchanged_on_error, wrapped_layers
from .folder import FORMAT_VERSION, cpu_copy, read_folder, write_folder

FORMAT = "qlora_tutorial.adapter"
WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter.json"


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


def base_settings(layer: Qlora_4_bit) -> dict:
    """The frozen base's kind and settings, as a file records them: {} for a dense base, {"quant_type":
    "int8"}, or the 4-bit quant_type, blocksize and double_quant (the compute dtype is a choice of the
    device that runs it, not of the weights)."""
    settings = layer.quant_nn.settings()
    settings.pop("compute_dtype", None)
    return settings


def adapter_config(model: nn.Module) -> dict:
    """The JSON config ``save_adapter`` writes: what is needed to rebuild the layers the weights fit.

    ``base`` is the frozen base's kind and settings (``base_settings``) when the layers share one, and
    ``bases`` maps each layer to its own when they do not.
    """
    layers = lora_layers(model)
    use_qlora = _shared_setting(layers, "use_qlora")
    dora = {"use_dora": True} if _shared_setting(layers, "use_dora") else {}
    bases = {name: base_settings(layer) for name, layer in layers.items()}
    shared = {json.dumps(b, sort_keys=True) for b in bases.values()}
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "base_model": base_model_id(model),
        "mode": "qlora" if use_qlora else "lora",
        **({"base": json.loads(shared.pop())} if len(shared) == 1 else {"bases": bases}),
        "r": _shared_setting(layers, "r"),
        "alpha": _shared_setting(layers, "alpha"),
        "rslora": _shared_setting(layers, "rslora"),
        "targets": list(layers),
        **dora,
    }


def saved_bases(config: dict) -> dict[str, dict] | None:
    """{layer: base settings} as an adapter config records them, or None for files written before the
    base was recorded."""
    if "bases" in config:
        return config["bases"]
    if "base" in config:
        return {name: config["base"] for name in config["targets"]}
    return None


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<layer>.W_a": (in, r), "<layer>.W_b": (r, out)} (and DoRA's "<layer>.magnitude": (out,)) as
    detached contiguous CPU copies."""
    tensors = {}
    for name, layer in lora_layers(model).items():
        for key, shape in adapter_shapes(name, layer).items():
            tensors[key] = cpu_copy(getattr(layer, key.rsplit(".", 1)[1]))
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
    return write_folder(path, CONFIG_FILE, config, WEIGHTS_FILE, tensors)


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
    peft_hint = "It holds a PEFT adapter: use import_peft." if (Path(path) / "adapter_config.json").is_file() else ""
    config, tensors = read_folder(path, CONFIG_FILE, WEIGHTS_FILE, fmt=FORMAT, what="adapter folder",
                                  hint=peft_hint or "save_adapter writes both.")
    for key in ("r", "alpha", "rslora", "mode", "targets"):
        if key not in config:
            raise ValueError(f"{CONFIG_FILE} lacks the field {key!r}")
    if config["mode"] not in ("qlora", "lora"):
        raise ValueError(f"{CONFIG_FILE}: mode must be 'qlora' or 'lora', got {config['mode']!r}")
    if not isinstance(config["targets"], list) or not all(isinstance(t, str) for t in config["targets"]):
        raise ValueError(f"{CONFIG_FILE}: targets must be a list of layer names, got {config['targets']!r}")
    _check_bases(config)
    return config, tensors


BASE_FIELDS = {"quant_type": str, "blocksize": int, "double_quant": bool}


def _check_bases(config: dict) -> None:
    """The recorded bases: a dict of known fields for each target, none for an unquantized (lora) base."""
    if "base" in config and "bases" in config:
        raise ValueError(f"{CONFIG_FILE} holds both 'base' and 'bases'; it is damaged")
    if "bases" in config and (not isinstance(config["bases"], dict) or set(config["bases"]) != set(config["targets"])):
        raise ValueError(f"{CONFIG_FILE}: 'bases' must give the base of each of the targets and nothing else")
    for name, base in (saved_bases(config) or {}).items():
        if not isinstance(base, dict) or any(k not in BASE_FIELDS or not isinstance(v, BASE_FIELDS[k])
                                             for k, v in base.items()):
            raise ValueError(f"{CONFIG_FILE}: the base of {name} must be a dict of {sorted(BASE_FIELDS)} with a str, "
                             f"an int and a bool, got {base!r}; the file is damaged")
        if config["mode"] == "lora" and base:
            raise ValueError(f"{CONFIG_FILE}: mode 'lora' (an unquantized base) but the base of {name} is {base}; "
                             "the file is damaged")


def _list(names, limit: int = 4) -> str:
    return name_list(sorted(names), limit)


def load_adapter(model: nn.Module, path, use_qlora: bool | None = None) -> nn.Module:
    """Load an adapter saved by ``save_adapter`` into ``model``; return the model.

    A plain model (no ``Qlora_4_bit`` layers yet) is first wrapped as the config says: the same
    targets, r, alpha and rsLoRA, in the saved mode with the saved base (``use_qlora=None``), or in the
    mode asked for (``use_qlora=False``: the adapter on the unquantized weights). A model already
    wrapped must have exactly the saved layers, with the same rank and scale, and, if it is quantized as
    the adapter's base was, the same kind of base with the same settings. Missing or unexpected
    tensors, another rank, shape, scale or base raise an error, so no LoRA matrix is ever left at its
    initial value by accident, and no adapter runs on another base than the one it was trained on
    unless asked to.
    """
    config, tensors = read_adapter(path)
    saved_qlora = config["mode"] == "qlora"
    asked = use_qlora
    if use_qlora is None:
        use_qlora = saved_qlora
    bases = saved_bases(config)
    if bases is None and saved_qlora:
        warnings.warn(f"{CONFIG_FILE} does not record the base the adapter was trained on (an older version of this "
                      "package wrote it); a plain model is wrapped with the default base, NF4 with double "
                      "quantization. If it was trained on another base, wrap the model with that base before "
                      "loading", stacklevel=2)
    # the saved bases when the adapter goes back into its own mode; an unquantized base otherwise
    if not (use_qlora and saved_qlora) or bases is None:
        bases = {name: {} for name in config["targets"]}
    # Wrapping comes first (the checks need the layers); any failure below unwraps the model again.
    with unchanged_on_error(model):
        if not wrapped_layers(model):
            groups: dict[str, list[str]] = {}
            for name, base in bases.items():
                groups.setdefault(json.dumps(base, sort_keys=True), []).append(name)
            for base, names in groups.items():
                quantize_model(model, names, config["alpha"], config["r"], use_qlora=use_qlora,
                               rslora=config["rslora"], use_dora=config.get("use_dora", False), **json.loads(base))
        elif asked is not None:
            other = [n for n, layer in lora_layers(model).items() if layer.use_qlora != asked]
            if other:
                raise ValueError(f"use_qlora={asked} asks for {'a quantized' if asked else 'an unquantized'} base, but "
                                 f"the model is wrapped otherwise ({_list(other)}); load into a plain model, or leave "
                                 "use_qlora out")
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

    saved = saved_bases(config) or {}
    for name, layer in layers.items():
        # an adapter trained on a quantized base, loaded into layers quantized otherwise: it would run on
        # other weights than it learned against (a dense base is a deliberate choice: use_qlora=False)
        if name in saved and config["mode"] == "qlora" and layer.use_qlora and base_settings(layer) != saved[name]:
            raise ValueError(f"{name}: the adapter was trained on a base with {saved[name]}, but the layer's base has "
                             f"{base_settings(layer)}; wrap the model with the adapter's base settings, or load it "
                             "into a plain model")
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

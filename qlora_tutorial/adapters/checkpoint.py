"""Whole-model checkpoints: a model with ``Qlora_4_bit`` layers, base included, saved and read back bit-exact.

``save_quantized(model, folder)`` writes the full state dict (the 4-bit layers as bitsandbytes
stores them: packed bytes, block scales, code, the double quantization's constants; LoRA matrices;
every other weight) into ``quantized.safetensors``, and how each layer was wrapped into
``quantized.json``. ``load_quantized(model_or_config, folder)`` wraps a plain model the same way and
loads it. ``model.state_dict()`` / ``load_state_dict(strict=True)`` round-trip too. transformers'
``save_pretrained`` refuses a wrapped model (``from_pretrained`` would re-initialise the layers it
does not know); it works again after ``merge``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..layer import Base4bit, Base8bit
from ..quantize import quantize_model, unchanged_on_error, wrapped_layers
from .folder import FORMAT_VERSION, read_folder, write_folder
from .ours import BASE_FIELDS, _list, base_model_id


QUANTIZED_FORMAT = "qlora_tutorial.quantized"
QUANTIZED_WEIGHTS_FILE = "quantized.safetensors"
# what a layer's entry may hold, and of which type (compress_statistics: files of earlier versions)
LAYER_FIELDS = {"alpha": (int, float), "r": int, "require_lora": bool, "use_qlora": bool, "rslora": bool,
                "use_dora": bool, **BASE_FIELDS, "compress_statistics": bool}


def _place(t: torch.Tensor) -> tuple:
    """Where a tensor's values live: two names with the same place are one tensor (tied weights)."""
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype
QUANTIZED_CONFIG_FILE = "quantized.json"


def save_quantized(model: nn.Module, path) -> Path:
    """Write a whole model with ``Qlora_4_bit`` layers into the folder ``path``; return the folder.

    Two files: ``quantized.safetensors`` holds the full state dict (the 4-bit layers as bitsandbytes
    stores them: packed bytes, block scales, code, and the double quantization's constants; LoRA
    matrices; every other weight), ``quantized.json`` how each layer was wrapped.
    ``load_quantized`` reads it back bit-exact. Tied weights are stored once.
    """
    layers = {name: model.get_submodule(name).settings() for name in wrapped_layers(model)}
    if not layers:
        raise ValueError("the model has no Qlora_4_bit layers: save a plain model with save_pretrained "
                         "(transformers) or safetensors.torch.save_model")
    for settings in layers.values():
        settings.pop("compute_dtype", None)  # a choice for the device it runs on, not part of the weights
    # packed 4-bit bytes go into the file as bytes, whatever element type they are kept in (FSDP keeps
    # them as the model's dtype: fsdp.set_quant_storage), so that any fresh model can load them
    packed_keys = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, Base4bit) and m.is_quantized}
    tensors, aliases, storages = {}, {}, {}
    for key, value in model.state_dict().items():
        value = value.detach()
        if key in packed_keys and value.dtype != torch.uint8:
            value = value.reshape(-1).view(torch.uint8).unsqueeze(1)
        place = _place(value)
        if value.numel() and place in storages:  # the same tensor under a second name (tied weights)
            aliases[key] = storages[place]
            continue
        shared = value.numel() and any(p[0] == place[0] for p in storages)
        storages[place] = key
        # safetensors stores no two names on one memory block: copy the tensors that share one
        tensors[key] = (value.clone() if shared else value).to("cpu").contiguous()
    config = {"format": QUANTIZED_FORMAT, "format_version": FORMAT_VERSION, "base_model": base_model_id(model),
              "model_class": type(model).__name__, "layers": layers, "aliases": aliases}
    return write_folder(path, QUANTIZED_CONFIG_FILE, config, QUANTIZED_WEIGHTS_FILE, tensors)


def read_quantized(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, state dict) from a folder written by ``save_quantized``; tied names filled in."""
    config, tensors = read_folder(path, QUANTIZED_CONFIG_FILE, QUANTIZED_WEIGHTS_FILE, fmt=QUANTIZED_FORMAT,
                                  what="folder", hint="save_quantized writes both.")
    layers = config.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{QUANTIZED_CONFIG_FILE} lacks the field 'layers' (how each layer was wrapped): the file "
                         "is damaged, or was not written by save_quantized")
    for name, settings in layers.items():
        for key in ("alpha", "r"):
            if not isinstance(settings, dict) or key not in settings:
                raise ValueError(f"{QUANTIZED_CONFIG_FILE}: layer {name} lacks {key!r}; the file is damaged")
        wrong = {k: v for k, v in settings.items() if k not in LAYER_FIELDS or not isinstance(v, LAYER_FIELDS[k])}
        if wrong:
            raise ValueError(f"{QUANTIZED_CONFIG_FILE}: layer {name} has settings {wrong} that quantize_model does not "
                             "take in that form; the file is damaged")
    aliases = config.get("aliases", {})
    if not isinstance(aliases, dict) or not all(key in tensors and alias not in tensors
                                                for alias, key in aliases.items()):
        raise ValueError(f"{QUANTIZED_CONFIG_FILE}: its 'aliases' must name tensors the file holds, under names it "
                         "does not hold; the file is damaged")
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
    with unchanged_on_error(model, values=True):  # load_state_dict copies into the model's tensors
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
        _check_state_fits(model, tensors)
        model.load_state_dict(tensors, strict=True)
    return model


def _check_state_fits(model: nn.Module, tensors: dict) -> None:
    """The whole file against the model, before anything is copied: the keys, the shape, dtype and
    values of every tensor, and every 4-bit weight's quantization state (readable, with the layer's
    settings and shape)."""
    expected = model.state_dict()
    missing, unexpected = expected.keys() - tensors.keys(), tensors.keys() - expected.keys()
    if missing or unexpected:
        parts = ([f"missing from the file: {_list(missing)}"] if missing else []) + (
            [f"in the file but not in the model: {_list(unexpected)}"] if unexpected else [])
        raise ValueError("the saved model does not fit this model (" + "; ".join(parts) + "); load it into a "
                         "model of the architecture it was saved from")
    stored_as = [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, Base4bit) and m.is_quantized
                 and m.weight.dtype != torch.uint8]
    if stored_as:
        raise ValueError(f"the model keeps its 4-bit bytes as {expected[stored_as[0]].dtype} "
                         f"({_list(stored_as, 2)}; fsdp.set_quant_storage does that): load the file into the model "
                         "before calling set_quant_storage")
    # (bitsandbytes' packed quant_state entry is JSON text whose length varies: no fixed shape)
    wrong = [f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if ".quant_state.bitsandbytes__" not in k and tuple(tensors[k].shape) != tuple(v.shape)]
    if wrong:
        raise ValueError(f"shapes differ between the file and the model: {_list(wrong, 3)}; another model size?")
    wrong = [f"{k} is {tensors[k].dtype} in the file, {v.dtype} in the model" for k, v in expected.items()
             if tensors[k].dtype != v.dtype]
    if wrong:
        raise ValueError(f"dtypes differ between the file and the model: {_list(wrong, 3)}; the file is damaged, "
                         "or was written from a model of other dtypes")
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"{_list(bad, 3)} holds NaN or inf values; the file is damaged (or saved from a diverged run)")
    # tensors the model shares (tied embeddings) must be one tensor in the file too
    shared: dict[tuple, list[str]] = {}
    for key, value in expected.items():
        if value.numel():
            shared.setdefault(_place(value), []).append(key)
    for keys in shared.values():
        if len(keys) > 1 and not all(torch.equal(tensors[keys[0]], tensors[k]) for k in keys[1:]):
            raise ValueError(f"the model ties {', '.join(keys)} (one tensor), but the file holds different values for "
                             "them; load it into a model of the same architecture that does not tie them")
    for name, module in model.named_modules():
        layer = name.removesuffix(".quant_nn")  # what errors call it: the Qlora_4_bit layer
        if isinstance(module, Base8bit):
            scales, fmt = tensors.get(f"{name}.SCB"), tensors.get(f"{name}.weight_format")
            if fmt is not None and fmt.numel() == 1 and int(fmt) != 0:
                raise ValueError(f"{layer}: the 8-bit weight's format is {int(fmt)}, but bitsandbytes reads only "
                                 "row-major weights (0); the file is damaged")
            if scales is not None and not (scales.shape == (module.out_features,) and (scales > 0).all()):
                raise ValueError(f"{layer}: the 8-bit weight's row scales (SCB) must be {module.out_features} "
                                 "positive numbers; the file is damaged")
        if isinstance(module, Base4bit):
            prefix = f"{name}.weight."
            stats = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
            try:
                module.check_saved(tensors[f"{name}.weight"], stats)
            except ValueError as e:
                raise ValueError(f"{layer}: {e}") from None

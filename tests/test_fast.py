"""The fast path: the 4-bit layer compiled without graph breaks and without a dense weight kept for the
backward, regional compilation, CUDA graphs of a whole step."""
import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from qlora_tutorial import Qlora_4_bit, fast, memory, quantize_model
from qlora_tutorial.bench import TARGETS
from qlora_tutorial.models import tiny_llama

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32


def layer(use_qlora=True, seed=0, **kw):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(256, 192).to(DEVICE, DTYPE)
    if use_qlora:
        kw["compute_dtype"] = DTYPE
    q = Qlora_4_bit.from_linear(lin, 16, 8, use_qlora=use_qlora, **kw)
    with torch.no_grad():
        q.W_b.normal_()  # B = 0 at init would hide the LoRA branch
    return q


@pytest.mark.parametrize("double_quant", [True, False])
def test_the_4bit_base_equals_bitsandbytes_forward_and_backward(double_quant):
    """Our 4-bit base (the book's MatMul4bit) against bitsandbytes' own Linear4bit.forward on the same
    module, outputs and input gradients. On CUDA with 2048 tokens both dequantize and call the same
    matmul: equal to the bit, as on the CPU."""
    from qlora_tutorial.matmul4bit import MatMul4bit

    base = layer(double_quant=double_quant).quant_nn
    x = torch.randn(2, 1024, 256, device=DEVICE, dtype=DTYPE, requires_grad=True)
    ref = bnb.nn.Linear4bit.forward(base, x)
    ref.float().square().sum().backward()
    grad_ref, x.grad = x.grad, None
    out = base(x)
    assert isinstance(out.grad_fn, MatMul4bit._backward_cls)  # the book's Function, not bitsandbytes'
    out.float().square().sum().backward()
    assert torch.equal(out, ref) and torch.equal(x.grad, grad_ref)


@pytest.mark.slow
@pytest.mark.parametrize("use_qlora", [True, False])
def test_layer_traces_without_graph_breaks(use_qlora):
    q = layer(use_qlora=use_qlora)
    x = torch.randn(2, 4, 256, device=DEVICE, dtype=DTYPE, requires_grad=True)
    explanation = torch._dynamo.explain(q)(x)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1
    # forward and backward through AOTAutograd, in one graph (fullgraph=True fails on any break)
    torch._dynamo.reset()
    compiled = torch.compile(q, backend="aot_eager", fullgraph=True)
    eager = q(x)
    eager.float().sum().backward()
    grads = (x.grad, q.W_a.grad, q.W_b.grad)
    x.grad = q.W_a.grad = q.W_b.grad = None
    out = compiled(x)
    out.float().sum().backward()
    tol = dict(rtol=2e-2, atol=2e-2) if DTYPE == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, eager, **tol)
    for a, b in zip((x.grad, q.W_a.grad, q.W_b.grad), grads):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("nested", [True, False])
def test_compiled_layer_keeps_no_dense_weight_for_the_backward(nested):
    """Compiled, the 4-bit layer saves the packed weight for its backward, never the dequantized one.

    The forward graph's outputs beyond the layer's output are what the backward keeps alive. With the
    partitioner torch.compile uses for training (min-cut), no (out, in) floating-point tensor may be
    among them: the backward dequantizes again.
    """
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    q = layer(double_quant=nested)
    saved, ops = [], {}

    def ops_of(gm):
        return [str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "qlora_tutorial" in str(n.target)]

    def forward_compiler(gm, example_inputs):
        (outputs,) = [n.args[0] for n in gm.graph.nodes if n.op == "output"]
        saved.extend((tuple(o.meta["val"].shape), o.meta["val"].dtype) for o in outputs[1:])
        ops["forward"] = ops_of(gm)
        return gm.forward

    def backward_compiler(gm, example_inputs):
        ops["backward"] = ops_of(gm)
        return gm.forward

    def backend(gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=forward_compiler, bw_compiler=backward_compiler,
                                     partition_fn=min_cut_rematerialization_partition)

    torch._dynamo.reset()
    x = torch.randn(2, 4, 256, device=DEVICE, dtype=DTYPE, requires_grad=True)
    torch.compile(q, backend=backend, fullgraph=True)(x).float().sum().backward()
    torch._dynamo.reset()
    dense = [(shape, dtype) for shape, dtype in saved if shape in ((192, 256), (256, 192))]
    assert not dense, f"the compiled forward keeps the dequantized weight for the backward: {saved}"
    # what it keeps instead: the packed bytes, half a byte per weight
    assert any(dtype == torch.uint8 and torch.Size(shape).numel() == 192 * 256 // 2 for shape, dtype in saved), saved
    # the compiled layer is MatMul4bit's: one dequantization each way, through its two operators
    assert ops == {"forward": ["qlora_tutorial.dequantize_4bit.default"],
                   "backward": ["qlora_tutorial.dequantize_4bit_again.default"]}, ops


def test_eager_matmul_dequantizes_without_the_operator_dispatch(monkeypatch):
    """Eager: the 4-bit matmul calls the backend directly, not through the custom operator, whose Python
    dispatch costs more than the kernel on a GPU; compiled: the operator (the test above)."""
    from qlora_tutorial import matmul4bit

    q = layer()
    calls = []
    for name in ("dequantize_op", "dequantize_again"):
        op = getattr(matmul4bit, name)
        monkeypatch.setattr(matmul4bit, name, lambda *a, _op=op, _n=name, **k: calls.append(_n) or _op(*a, **k))
    x = torch.randn(2, 4, 256, device=DEVICE, dtype=DTYPE, requires_grad=True)
    out = q.quant_nn(x)
    out.float().sum().backward()
    assert calls == []
    expected = torch.nn.functional.linear(x.detach(), q.base_weight().to(DTYPE), q.bias.to(DTYPE))
    assert torch.equal(out.detach(), expected)


@pytest.mark.slow
def test_compile_for_training_compiles_each_decoder_layer():
    model = quantize_model(tiny_llama().to(DEVICE), TARGETS, 8, 4, compute_dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 16), device=DEVICE)
    eager = model(input_ids=ids, labels=ids).loss
    torch._dynamo.reset()
    assert fast.compile_for_training(model, backend="aot_eager") is model
    blocks = fast.repeated_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers
    assert all(b._compiled_call_impl is not None for b in blocks)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-4, atol=1e-4)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="CapturedStep"):
        fast.compile_for_training(model, mode="reduce-overhead")
    with pytest.raises(ValueError, match="no nn.ModuleList"):
        fast.compile_for_training(torch.nn.Linear(2, 2))


def _kept_loss_and_grads(model, ids):
    """What one training forward keeps for the backward (``memory.saved_activation_bytes``), and the
    loss and LoRA gradients of a step."""
    kept = memory.saved_activation_bytes(model, ids)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return kept, loss.detach(), grads


@pytest.mark.slow
def test_a_memory_budget_keeps_fewer_activations_and_computes_the_same_step():
    """compile_for_training(memory_budget=b): the compiler's own forward/backward split (the
    min-cut partitioner, as the inductor backend uses it) keeps fewer bytes for the backward as the
    budget falls, and the step's loss and gradients stay those of the default split."""
    ids = torch.randint(0, 256, (2, 64), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    results = {}
    for budget in (None, 0.8, 0.5):
        torch._dynamo.reset()
        model = quantize_model(tiny_llama(hidden_size=128, intermediate_size=352).to(DEVICE), TARGETS, 8, 4,
                               compute_dtype=torch.float32)
        model.train()
        fast.compile_for_training(model, backend="aot_eager_decomp_partition", memory_budget=budget)
        _kept_loss_and_grads(model, ids)  # compiles
        results[budget] = _kept_loss_and_grads(model, ids)
    torch._dynamo.reset()
    default, eight, half = results[None], results[0.8], results[0.5]
    assert default[0] > eight[0] > half[0]
    assert eight[0] < 0.85 * default[0]
    for saved, loss, grads in (eight, half):
        torch.testing.assert_close(loss, default[1], rtol=1e-6, atol=0)
        for g, g0 in zip(grads, default[2], strict=True):
            torch.testing.assert_close(g, g0, rtol=1e-5, atol=1e-7)
    block = fast.repeated_blocks(model)[0]
    assert block._compiled_call_impl.memory_budget == 0.5
    for bad in (1.5, -0.2, float("nan")):
        with pytest.raises(ValueError, match="memory_budget"):
            fast.compile_for_training(model, memory_budget=bad)


def test_captured_step_needs_cuda_and_a_capturable_optimizer():
    model = tiny_llama().to(DEVICE)
    ids = torch.randint(0, 256, (2, 16), device=DEVICE)
    if not CUDA:
        with pytest.raises(RuntimeError, match="CUDA GPU"):
            fast.CapturedStep(model, torch.optim.AdamW(model.parameters()), input_ids=ids, labels=ids)
        return
    with pytest.raises(ValueError, match="capturable=True"):
        fast.CapturedStep(model, torch.optim.AdamW(model.parameters()), input_ids=ids, labels=ids)


def test_recording_keeps_the_warmup_attention_path(monkeypatch):
    """transformers 5.17 builds a full causal mask when it sees a CUDA graph recording (it cannot check
    the batch for padding or packing then); the compiled layers, warmed up without a mask, would then
    recompile inside the recording, which fails. ``recording_like_warmup`` keeps the mask-free path for
    a batch without padding; ``same_mask_path`` gives a batch with an attention mask the full mask on both
    sides. The recording is simulated by transformers' own check answering yes."""
    import transformers.utils.import_utils as transformers_utils
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function

    model = tiny_llama()
    assert model.config._attn_implementation == "sdpa"
    original = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    masks = []
    model.model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(kwargs.get("attention_mask")), with_kwargs=True)
    ids = torch.randint(0, 256, (2, 16))
    # what transformers 5.17 asks for while recording: packing cannot be ruled out, so no causal shortcut
    asked = dict(batch_size=2, q_length=16, kv_length=16, mask_function=causal_mask_function, attention_mask=None,
                 allow_is_causal_skip=False, dtype=torch.float32, device="cpu")
    built = original(**asked)
    assert torch.equal(built, torch.ones(16, 16, dtype=torch.bool).tril().expand(2, 1, 16, 16))  # causality alone
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        monkeypatch.setattr(transformers_utils, "is_cuda_stream_capturing", lambda: True)
        with fast.recording_like_warmup(model, {"input_ids": ids}):
            assert ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](**asked) is None  # the attention's causal flag instead
            recorded = model(input_ids=ids).logits
        assert ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] is original  # as it was
        # an attention mask given: the full mask, recorded or not, even where it masks nothing
        padded = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        monkeypatch.setattr(transformers_utils, "is_cuda_stream_capturing", lambda: False)
        outside = model(**padded).logits
        with fast.same_mask_path(model, padded):
            model(**padded)
        assert ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] is original
    # the other half of its job: whatever would still compile while recording raises, naming the cause
    double = torch.compile(lambda t: 2 * t, backend="eager")
    double(torch.ones(3))
    with pytest.raises(torch._dynamo.exc.RecompileError):
        with fast.recording_like_warmup(torch.nn.Linear(2, 2), {}):
            double(torch.ones(3, dtype=torch.float64))
    assert masks[0] is None and masks[1] is None  # outside a recording, and recording with the helper
    assert masks[2] is None  # no padding, outside a recording: transformers' shortcut
    assert torch.equal(masks[3], torch.ones(16, 16, dtype=torch.bool).tril().expand(2, 1, 16, 16))  # one path
    torch.testing.assert_close(outside, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(recorded, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("compiled", [False, True])
def test_captured_qlora_step_trains_like_eager(compiled):
    """The same QLoRA model and batches, stepped eagerly and through the recorded graph (of the model as
    it is, or compiled layer by layer first): the same losses."""
    losses = {}
    for how in ("eager", "graph"):
        torch.manual_seed(0)
        torch._dynamo.reset()
        model = quantize_model(tiny_llama().to(DEVICE), TARGETS, 8, 4, compute_dtype=torch.float32)
        if compiled and how == "graph":
            fast.compile_for_training(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, capturable=True)
        batches = [torch.randint(0, 256, (2, 16), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(i))
                   for i in range(6)]
        if how == "eager":
            run = []
            for _ in range(3):  # CapturedStep's warm-up steps on the example batch
                opt.zero_grad(set_to_none=True)
                model(input_ids=batches[0], labels=batches[0]).loss.backward()
                opt.step()
            for b in batches:
                opt.zero_grad(set_to_none=True)
                loss = model(input_ids=b, labels=b).loss
                loss.backward()
                opt.step()
                run.append(loss.item())
        else:
            step = fast.CapturedStep(model, opt, input_ids=batches[0], labels=batches[0])
            run = [step(input_ids=b, labels=b).item() for b in batches]
            with pytest.raises(ValueError, match="fixed shapes"):
                step(input_ids=batches[0][:1], labels=batches[0][:1])
        losses[how] = run
    assert losses["graph"][0] != losses["graph"][1]  # it trains
    torch.testing.assert_close(losses["graph"], losses["eager"], rtol=1e-3, atol=1e-3)


def test_the_layer_reads_bytes_stored_as_another_dtype():
    """FSDP stores the packed bytes as bfloat16 (quant_storage); the layer, eager and traced, must read
    them as bytes, as bitsandbytes does. Failed before with "rshift_cpu not implemented for 'BFloat16'"."""
    from qlora_tutorial.fsdp import set_quant_storage

    torch.manual_seed(0)
    layer = Qlora_4_bit.from_linear(nn.Linear(128, 64), alpha=4, r=2, compute_dtype=torch.float32)
    x = torch.randn(3, 128)
    expected = layer(x)
    set_quant_storage(layer, torch.bfloat16)
    assert layer.quant_nn.weight.dtype == torch.bfloat16
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(torch.compile(layer, backend="aot_eager", fullgraph=True)(x), expected, rtol=1e-5,
                               atol=1e-5)

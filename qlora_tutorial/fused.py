"""Fusions of the fast path: the work of a training step done with less memory and fewer passes.

Three pieces, each an option of ``fuse`` and each measured in chapter 13:

* **the head and the loss in chunks** (``ChunkedLMLoss``). A causal language model's last layer
  multiplies every token's hidden state by the vocabulary matrix: tokens x vocabulary logits (2,048 x
  128,256 for a Llama-3-8B batch of 2,048 tokens), which ``transformers`` then copies to float32 for the
  cross-entropy, and whose gradient is as large again. Here the tokens go through the head a chunk at
  a time: one and a half chunks' float32 logits exist at once, and the gradient with respect to the hidden states
  is computed in the same pass (the loss is the last thing the forward computes, so its gradient is
  known in advance up to the one factor the backward brings). What is stored for the backward is that
  gradient, tokens x hidden, instead of the logits.
* **activations saved on the host** (``offloaded_activations``). With activation checkpointing, the
  tensors kept between forward and backward are each decoder layer's input plus what lies outside the
  layers (the final norm's input, the head's). Under this context they wait in pinned host memory
  instead, copied out asynchronously as the forward goes and back as the backward reaches them.
* **SwiGLU with its SiLU computed again** (``SwiGLU``). A Llama MLP computes ``down(silu(gate(x)) * up(x))``;
  eager PyTorch keeps ``gate(x)`` for the SiLU's backward and both ``silu(gate(x))`` and ``up(x)`` for the
  product's: three tensors of tokens x intermediate size per layer. ``SwiGLU`` keeps ``gate(x)`` and
  ``up(x)`` and computes the SiLU again in the backward, and its backward writes one gradient into the
  memory of ``up(x)``, which nothing needs after it.

The fused and the unfused step compute the same loss and gradients (``tests/test_fused.py`` checks
them against ``transformers``' own; SwiGLU's to the bit). All three are plain PyTorch: they run on
the CPU, and the chunked loss runs inside a recorded CUDA graph (``fast.CapturedStep``), where its chunks cost no
host time. Host offloading cannot be recorded: a graph has no place for host buffers that each step
allocates. For speed, the RMSNorm, rotary embedding and SwiGLU of each decoder layer need no kernel
of their own: ``fast.compile_for_training`` compiles each layer, and the compiler fuses their
elementwise work into a few kernels; its ``memory_budget`` sets how much of their activations each compiled
layer keeps for the backward and how much it computes again.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from .train import IGNORE_INDEX  # the label of "no loss here" (padding, the prompt)

# why a step with offloaded activations cannot be recorded (fast.CapturedStep raises it, fast.FastTrainer falls back)
OFFLOAD_NOT_RECORDABLE = ("the model offloads its activations to the host (fused.fuse(offload=True)), which a CUDA "
                          "graph cannot record")
DEFAULT_CHUNK_BYTES = 64 * 2**20  # float32 logits of one chunk: 64 MiB (512 tokens of a 32,000 vocabulary)
TILE_TOKENS = 128  # a chunk of at least this many tokens is cut to a multiple of it: whole tiles of a GPU matmul


# ------------------------------------------------------------------ the head and the loss, in chunks
class ChunkedLMLoss(torch.autograd.Function):
    """``loss = sum over tokens of cross_entropy(hidden @ weight.T, targets) / divisor``, a chunk of
    tokens at a time.

    ``hidden`` (tokens, hidden size) in the compute dtype; ``weight`` (vocabulary, hidden size) the
    head's; ``targets`` (tokens,) with ``IGNORE_INDEX`` where no loss is taken; ``divisor`` a 0-d
    tensor (the number of targets, or the Trainer's token count over accumulated micro-batches).

    Each chunk's logits are computed in the compute dtype and taken to float32, as ``transformers``
    does; the gradient of the loss with respect to them is ``softmax - one_hot``, divided by the
    divisor in float32 and taken back to the compute dtype before it meets the head's weight, again
    as ``transformers``' backward does. The backward only multiplies the stored gradients by the
    incoming one: the gradient with respect to the loss, a scalar (1 for a plain ``backward()``).

    The softmax and the gradient are computed in place, in the float32 logits' memory, and a chunk's
    tensors go before the next chunk's are made: what exists at once is one and a half chunks of
    float32 logits (the product in the compute dtype while its float32 copy is made; later the float32
    gradient while its copy in the compute dtype is made).

    A head that trains (``weight.requires_grad``) gets its gradient too, accumulated in float32 over
    the chunks: vocabulary x hidden float32 values held from the forward to the backward (2 GiB for
    Llama-3-8B's head). In a recorded CUDA graph, give ``divisor`` as a tensor already on the GPU.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, divisor, chunk_tokens):
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if weight.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # a batch whose every label is ignored: the loss is 0 / 0 (NaN, as in transformers) and the
        # gradients are 0 (as PyTorch's cross-entropy gives them), not NaN
        inverse = 1.0 / divisor.to(torch.float32).clamp_min(1)
        for start in range(0, hidden.shape[0], chunk_tokens):
            h = hidden[start:start + chunk_tokens]
            t = targets[start:start + chunk_tokens]
            logits = (h @ weight.t()).float()  # the chunk's bf16 product and its float32 copy: 1.5 chunks
            valid = t != IGNORE_INDEX
            safe = torch.where(valid, t, 0).unsqueeze(1)
            picked = logits.gather(1, safe).squeeze(1)  # the target's logit, before the softmax overwrites it
            # the softmax in place, in the logits' memory: exp(logits - max) / sum
            top = logits.amax(dim=1, keepdim=True)
            probs = logits.sub_(top).exp_()
            sums = probs.sum(dim=1, keepdim=True)
            lse = (sums.log() + top).squeeze(1)  # log of the sum of exp(logits)
            total += ((lse - picked) * valid).sum()
            # d loss / d logits = (softmax - one_hot) / divisor on the tokens that count, 0 elsewhere
            weight_of = valid.to(torch.float32) * inverse
            probs.mul_((weight_of.unsqueeze(1) / sums))
            probs.scatter_add_(1, safe, -weight_of.unsqueeze(1))
            grad = probs.to(hidden.dtype)  # float32 and bf16 gradient: again 1.5 chunks
            del logits, probs  # the float32 chunk goes before the next chunk's is made
            torch.matmul(grad, weight, out=grad_hidden[start:start + chunk_tokens])
            if grad_weight is not None:
                grad_weight.addmm_(grad.t().float(), h.float())
            del grad
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total / divisor.to(torch.float32)

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        dh = grad_hidden * grad_loss.to(grad_hidden.dtype)
        dw = None if grad_weight is None else (grad_weight * grad_loss).to(dh.dtype)
        return dh, dw, None, None, None


def chunk_tokens_for(vocab_size: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """How many tokens' float32 logits fit in ``chunk_bytes``: a multiple of ``TILE_TOKENS`` where at
    least that many fit (a GPU multiplies in tiles of rows, and a part-filled tile costs a whole one)."""
    tokens = chunk_bytes // (4 * vocab_size)
    return max(1, tokens - tokens % TILE_TOKENS if tokens >= TILE_TOKENS else tokens)


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   num_items_in_batch=None, chunk_tokens: int | None = None) -> torch.Tensor:
    """The causal language-model loss of ``transformers`` (``ForCausalLMLoss``) without its logits.

    ``hidden`` (batch, sequence, hidden size): the decoder's output; ``weight``: the head's;
    ``labels`` (batch, sequence): token ``i`` is scored on predicting label ``i + 1``. The mean over
    the labels that are not ``IGNORE_INDEX``, or their sum over ``num_items_in_batch`` where the
    Trainer gives that (the tokens of every micro-batch of an accumulated step). Ignored labels get
    no loss and a zero gradient. Inside a recorded CUDA graph, ``num_items_in_batch`` must be a
    tensor on the GPU (a Python number would be copied in at recording time and then fixed).
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"chunked loss: hidden states {tuple(hidden.shape)} and labels {tuple(labels.shape)} "
                         "do not match (one label per position)")
    targets = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    if num_items_in_batch is None:
        divisor = (targets != IGNORE_INDEX).sum()
    else:
        divisor = torch.as_tensor(num_items_in_batch, device=hidden.device)
    chunk = chunk_tokens or chunk_tokens_for(weight.shape[0])
    return ChunkedLMLoss.apply(flat, weight, targets.to(hidden.device), divisor, int(chunk))


# ------------------------------------------------------------------ SwiGLU, its SiLU computed again
class SwiGLU(torch.autograd.Function):
    """``silu(gate) * up``, keeping ``gate`` and ``up`` for the backward and nothing else.

    Eager PyTorch keeps three tensors of this shape: ``gate`` (the SiLU's input), ``silu(gate)`` and
    ``up`` (the product's inputs). The backward here computes ``silu(gate)`` again, one element-wise
    pass, and the same gradients to the bit: ``grad * silu(gate)`` for ``up``, and for ``gate`` the
    SiLU's own backward of ``grad * up``, which it writes into ``up``'s memory. So it can run once: a
    second backward through the same graph (``retain_graph=True``) is refused.
    """

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        ctx.spent = False
        return nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        if ctx.spent:
            raise RuntimeError("fused.SwiGLU: its backward reuses the memory of what it saved and cannot run twice "
                               "(retain_graph=True); use fuse(model, swiglu=False) to backpropagate twice")
        ctx.spent = True
        gate, up = ctx.saved_tensors
        grad_up = grad * nn.functional.silu(gate)
        grad_gate = torch.ops.aten.silu_backward(up.mul_(grad), gate)
        return grad_gate, grad_up


def swiglu_mlps(model: nn.Module) -> list[nn.Module]:
    """The MLPs of ``model`` that ``SwiGLU`` computes: modules with ``gate_proj``, ``up_proj``,
    ``down_proj`` and a SiLU ``act_fn`` (Llama's, Mistral's, Qwen's)."""
    from transformers.activations import SiLUActivation

    return [m for m in model.modules()
            if all(hasattr(m, name) for name in ("gate_proj", "up_proj", "down_proj"))
            and type(getattr(m, "act_fn", None)) in (nn.SiLU, SiLUActivation)]


def _swiglu_forward(mlp, x):
    return mlp.down_proj(SwiGLU.apply(mlp.gate_proj(x), mlp.up_proj(x)))


# ------------------------------------------------------------------ activations on the host
@contextlib.contextmanager
def offloaded_activations(model: nn.Module, min_bytes: int = 2**20):
    """While the forward runs: every tensor autograd saves for the backward, of at least ``min_bytes``
    and on a GPU, is copied to pinned host memory (asynchronously, on the compute stream) and brought
    back when the backward needs it. The model's own parameters and buffers stay where they are.

    With activation checkpointing on, what is saved is little (each decoder layer's input, and what
    lies outside the layers), and this moves it off the GPU. Without checkpointing it moves every
    activation, which costs far more transfer than it saves.
    """
    own = {t.data_ptr() for t in model.parameters()} | {t.data_ptr() for t in model.buffers()}

    def pack(tensor):
        if tensor.device.type != "cuda" or tensor.numel() * tensor.element_size() < min_bytes or \
                tensor.data_ptr() in own:
            return tensor
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        return tensor.device, host

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=True)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


# ------------------------------------------------------------------ both, as one option of a model
def causal_lm(model: nn.Module) -> nn.Module:
    """The ``...ForCausalLM`` module inside ``model`` (a PEFT model's, or the model itself): the one
    with a decoder (``.model``) and a head (``.lm_head``)."""
    for module in model.modules():
        children = module._modules  # its own submodules (a PeftModel would hand on .lm_head from inside)
        if isinstance(children.get("lm_head"), nn.Linear) and isinstance(children.get("model"), nn.Module):
            return module
    raise ValueError(f"{type(model).__name__} has no causal language model inside (a module with .model and an "
                     "nn.Linear .lm_head): fuse works on transformers' ...ForCausalLM models")


def fuse(model: nn.Module, chunked_loss: bool = True, offload: bool = False, swiglu: bool = False,
         chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> nn.Module:
    """Switch the fusions on for ``model`` (in place; returns it). ``unfuse`` switches them off.

    ``chunked_loss``: with ``labels``, the forward returns the loss of ``causal_lm_loss`` and no logits
    (``logits`` is None); without labels it is the model's own forward. ``offload``: the forward runs
    under ``offloaded_activations`` (meant for use with activation checkpointing; not in a recorded
    CUDA graph). ``swiglu``: every MLP of ``swiglu_mlps`` computes its product with ``SwiGLU``.
    Models whose head is more than a matrix (a bias, a logit scale or soft-capping) are refused: the
    chunked loss computes ``hidden @ weight.T`` and nothing else.
    """
    if not (chunked_loss or offload or swiglu):
        raise ValueError("fuse with chunked_loss=False, offload=False and swiglu=False would change nothing; "
                         "call unfuse instead")
    lm = causal_lm(model)
    mlps = swiglu_mlps(lm) if swiglu else []
    if swiglu and not mlps:
        raise ValueError(f"fuse(swiglu=True): {type(lm).__name__} has no MLP with gate_proj, up_proj, down_proj and "
                         "a SiLU act_fn; use swiglu=False")
    config = getattr(lm, "config", None)
    if chunked_loss:
        odd = [name for name in ("final_logit_softcapping", "logit_scale", "logits_scaling")
               if getattr(config, name, None) not in (None, 1, 1.0)]
        if lm.lm_head.bias is not None:
            odd.append("lm_head.bias")
        if odd:
            raise ValueError(f"{type(lm).__name__}: its head has {', '.join(odd)}, which the chunked loss does not "
                             "compute; use fuse(model, chunked_loss=False)")
    original = type(lm).forward.__get__(lm)
    tokens = chunk_tokens_for(lm.lm_head.out_features, chunk_bytes)

    @functools.wraps(original)
    def forward(*args, labels=None, **kwargs):
        context = offloaded_activations(model) if offload and torch.is_grad_enabled() else contextlib.nullcontext()
        with context:
            if labels is None or not chunked_loss:
                return original(*args, labels=labels, **kwargs)
            from transformers.modeling_outputs import CausalLMOutputWithPast

            num_items = kwargs.pop("num_items_in_batch", None)
            if kwargs.pop("logits_to_keep", 0) not in (0, None):
                raise ValueError(f"{type(lm).__name__} with the chunked loss: logits_to_keep scores only some "
                                 "positions, which the chunked loss does not; leave it out when giving labels")
            outputs = lm.model(*args, **kwargs)
            loss = causal_lm_loss(outputs.last_hidden_state, lm.lm_head.weight, labels, num_items, tokens)
            return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=outputs.hidden_states,
                                          attentions=outputs.attentions)

    unfuse(model)
    lm.forward = forward
    for mlp in mlps:
        mlp.forward = functools.partial(_swiglu_forward, mlp)
    lm._qlora_fused = {"chunked_loss": chunked_loss, "offload": offload, "swiglu": swiglu, "chunk_tokens": tokens}
    return model


def unfuse(model: nn.Module) -> nn.Module:
    """The model's own forward again (in place; returns it)."""
    lm = causal_lm(model)
    if "forward" in vars(lm):
        del lm.forward
    if vars(lm).pop("_qlora_fused", {}).get("swiglu"):
        for mlp in swiglu_mlps(lm):
            vars(mlp).pop("forward", None)
    return model


def fused_options(model: nn.Module) -> dict:
    """What ``fuse`` switched on for ``model`` ({} where nothing)."""
    try:
        return dict(getattr(causal_lm(model), "_qlora_fused", {}))
    except ValueError:
        return {}

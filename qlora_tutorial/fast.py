"""Making a training step fast: the 4-bit weights through our own kernel, compilation, CUDA graphs.

A LoRA step on a large GPU is mostly the host's work: Python and PyTorch dispatch thousands of small
operations per step while the GPU waits. Three tools remove that, each measured in the book:

* the Triton kernel (``nf4_triton``): importing this module registers it as the backend that
  dequantizes NF4 weights on CUDA in ``Qlora_4_bit``'s 4-bit matmul (``matmul4bit.MatMul4bit``), one
  launch per dequantization, which ``torch.compile`` keeps as one opaque operator and a CUDA graph
  records;
* ``compile_for_training``: ``torch.compile`` on each repeated block (the decoder layers), so one
  compilation serves every layer ("regional compilation": seconds, not minutes, for a 22-layer model).
* ``CapturedStep``: a whole training step (forward, loss, backward, optimizer step) recorded once as a
  CUDA graph and replayed: one launch per step, so the step takes the GPU's time and nothing more.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from . import nf4_triton  # noqa: F401  (registers the Triton kernel as the CUDA backend of the 4-bit matmul)


# ------------------------------------------------------------------ compilation
def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks a model repeats: the items of its longest ``nn.ModuleList`` whose items share a class."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            if len({type(m) for m in module}) == 1:
                best = list(module)
    return best


def compile_for_training(model: nn.Module, mode: str = "default", regional: bool = True, **kwargs) -> nn.Module:
    """``torch.compile`` a model for training, in place; returns it.

    ``regional=True`` compiles each repeated block (the decoder layers) rather than the whole model:
    the blocks share one compiled graph, so a 22-layer model compiles in the time of one layer. The
    rest (embeddings, head, loss) stays eager; it is a few operations. ``mode`` is
    ``torch.compile``'s: ``"default"``, or ``"max-autotune-no-cudagraphs"``. For CUDA graphs, record the
    whole step with ``CapturedStep`` (on top of this or not): per-region graphs would still leave the
    launches between regions to the host.
    """
    if mode not in ("default", "max-autotune-no-cudagraphs"):
        raise ValueError(f"mode {mode!r}: use 'default' or 'max-autotune-no-cudagraphs' here, and CapturedStep "
                         "for CUDA graphs (torch.compile's 'reduce-overhead' graphs each region separately)")
    if not regional:
        model.compile(mode=mode, **kwargs)
        return model
    blocks = repeated_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of repeated blocks to compile; "
                         "use regional=False to compile the whole model")
    for block in blocks:
        block.compile(mode=mode, **kwargs)
    return model


# ------------------------------------------------------------------ CUDA graphs
@contextlib.contextmanager
def recording_like_warmup(model: nn.Module, inputs: dict):
    """While a step is recorded: the model's Python takes the path it took in the warm-up, and anything
    that would compile instead raises ``torch._dynamo.exc.RecompileError``.

    Hugging Face ``transformers`` cannot look at tensor values while a CUDA graph records (that would
    wait for the GPU), so when it sees a recording it gives up the shortcut it takes otherwise for a
    causal batch without padding, and builds a full attention mask. The compiled decoder layers, warmed
    up without a mask, would then be compiled again inside the recording, which fails. Where the batch has
    no ``attention_mask`` and no ``position_ids`` (a full causal batch, nothing to mask beyond causality),
    this makes the causal mask what it is outside a recording: none, with the attention's causal flag.
    It does so for models with PyTorch's ``sdpa`` attention; other models keep transformers' own path.
    The error covers recompiling what the warm-up compiled, which is what a changed path causes; a
    compiled function that the warm-up never called would be compiled for the first time, which this
    does not catch (the warm-up runs the same step, so every compiled region has run before).
    """
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    masks = None
    if implementation == "sdpa" and "attention_mask" not in inputs and "position_ids" not in inputs:
        try:
            from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS as masks
        except ImportError:  # not a transformers model, or a transformers without this registry
            masks = None
    saved = None
    if masks is not None:
        original = masks["sdpa"]
        saved = masks._local_mapping.get("sdpa")

        def causal_without_padding(**kwargs):
            # no padding and as many queries as keys: the mask is causality alone, which the attention's
            # causal flag gives (transformers checks the packing of the positions here outside a
            # recording; the batch has no position_ids, so they are 0, 1, 2, ... in every row)
            if kwargs.get("attention_mask") is None and kwargs.get("local_size") is None and \
                    kwargs["q_length"] == kwargs["kv_length"]:
                return None
            return original(**kwargs)

        masks["sdpa"] = causal_without_padding
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            yield
    finally:
        if masks is not None:
            if saved is None:
                del masks["sdpa"]
            else:
                masks["sdpa"] = saved


class CapturedStep:
    """A whole training step, recorded once as a CUDA graph and replayed: ``loss = step(input_ids=...)``.

    The recording runs the step on the example batch (after ``warmup`` ordinary steps on a side
    stream, which also compile whatever ``torch.compile`` wraps); each call copies the new batch into
    the recorded input tensors and replays. The model trains as usual: the optimizer's update is in
    the graph. Rules of CUDA graphs: every batch has the example's shapes; the optimizer must be
    created with ``capturable=True``; gradients live in the graph's memory (do not zero or replace
    them between steps: the recorded backward overwrites them); nothing in the step may wait for the
    host (no ``.item()``, no data-dependent shapes).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, warmup: int = 3, autocast=None,
                 **example):
        if not torch.cuda.is_available():
            raise RuntimeError("CapturedStep records a CUDA graph: it needs a CUDA GPU")
        if not example:
            raise ValueError("give the example batch as keyword arguments, e.g. CapturedStep(model, opt, input_ids=ids)")
        if not all(g.get("capturable", False) for g in optimizer.param_groups):
            raise ValueError(f"{type(optimizer).__name__} was not created with capturable=True: its step reads "
                             "the step count on the host and cannot be recorded. Create it with capturable=True.")
        if warmup < 1:
            raise ValueError(f"warmup must be at least 1 (kernels and compilation must exist before recording), got {warmup}")
        self.model, self.optimizer, self.autocast = model, optimizer, autocast
        self.inputs = {k: v.detach().clone() for k, v in example.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                optimizer.zero_grad(set_to_none=True)
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        optimizer.zero_grad(set_to_none=True)  # gradients are created inside the graph's memory
        self.graph = torch.cuda.CUDAGraph()
        generator = torch.cuda.default_generators[torch.cuda.current_device()]
        saved = generator.clone_state()
        try:
            # thread_local: a CUDA call from another thread (torch.compile's workers, for one) must not
            # invalidate the recording; only this thread's work is recorded either way
            with recording_like_warmup(model, self.inputs):
                with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                    self.loss = self._step()
        except Exception as exc:
            # a failed recording leaves the default random generator in capture mode, and every later
            # random draw on the GPU would fail: give it back its state from before
            generator.graphsafe_set_state(saved)
            if isinstance(exc, torch._dynamo.exc.RecompileError):
                raise RuntimeError(
                    "recording the step would recompile the compiled model (a CUDA graph cannot record "
                    f"compilation): the step took another path than in the warm-up ({exc}). Record a step "
                    "whose Python does the same while recording as outside it.") from exc
            raise

    def _step(self) -> torch.Tensor:
        if self.autocast is not None:
            with torch.autocast("cuda", dtype=self.autocast):
                loss = self.model(**self.inputs).loss
        else:
            loss = self.model(**self.inputs).loss
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def __call__(self, **batch) -> torch.Tensor:
        if set(batch) != set(self.inputs):
            raise ValueError(f"the recorded step takes {sorted(self.inputs)}, got {sorted(batch)}")
        for k, v in batch.items():
            if v.shape != self.inputs[k].shape:
                raise ValueError(f"{k} has shape {tuple(v.shape)}, the recorded step {tuple(self.inputs[k].shape)}: "
                                 "a CUDA graph replays fixed shapes (pad the batch, or record one step per shape)")
            self.inputs[k].copy_(v)
        self.graph.replay()
        return self.loss

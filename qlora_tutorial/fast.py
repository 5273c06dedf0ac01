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
import copy
import warnings

import torch
from torch import nn
from transformers import Trainer

from . import nf4_triton  # noqa: F401  (registers the Triton kernel as the CUDA backend of the 4-bit matmul)
from .fused import OFFLOAD_NOT_RECORDABLE, fused_options
from .train import checkpointing_on, make_trainer


# ------------------------------------------------------------------ compilation
def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks a model repeats: the items of its longest ``nn.ModuleList`` whose items share a class."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            if len({type(m) for m in module}) == 1:
                best = list(module)
    return best


def compile_for_training(model: nn.Module, mode: str = "default", regional: bool = True,
                         memory_budget: float | None = None, **kwargs) -> nn.Module:
    """``torch.compile`` a model for training, in place; returns it.

    ``regional=True`` compiles each repeated block (the decoder layers) rather than the whole model:
    the blocks share one compiled graph, so a 22-layer model compiles in the time of one layer. The
    rest (embeddings, head, loss) stays eager; it is a few operations. ``mode`` is
    ``torch.compile``'s: ``"default"``, or ``"max-autotune-no-cudagraphs"``. For CUDA graphs, record the
    whole step with ``CapturedStep`` (on top of this or not): per-region graphs would still leave the
    launches between regions to the host.

    ``memory_budget`` (0 to 1; None: the compiler's default, 1) moves what each compiled block keeps
    for the backward. The compiler splits a block's forward and backward itself ("min-cut
    rematerialization"): by default it computes again what its fused element-wise kernels make
    cheaply and keeps the rest (the inputs of matmuls, the results of reductions). At 0 a block keeps
    only its inputs and computes everything again; in between, the bytes it keeps above its inputs are
    at most that share of what the default keeps above them, the recomputation chosen by the
    compiler's estimate of each operation's cost (element-wise results and the small LoRA products
    x W_a first). It is PyTorch's ``activation_memory_budget``, applied while these blocks compile;
    chapter 13 measures what 0.8 saves and costs. Call ``torch._dynamo.reset()`` first to compile a
    model again with another budget.
    """
    if mode not in ("default", "max-autotune-no-cudagraphs"):
        raise ValueError(f"mode {mode!r}: use 'default' or 'max-autotune-no-cudagraphs' here, and CapturedStep "
                         "for CUDA graphs (torch.compile's 'reduce-overhead' graphs each region separately)")
    if memory_budget is not None and not 0 <= memory_budget <= 1:
        raise ValueError(f"memory_budget={memory_budget!r}: give a share from 0 (keep only each block's inputs) "
                         "to 1 (the compiler's default), or None")
    blocks = [model] if not regional else repeated_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of repeated blocks to compile; "
                         "use regional=False to compile the whole model")
    for block in blocks:
        block.compile(mode=mode, **kwargs)
        if memory_budget is not None:
            block._compiled_call_impl = _with_memory_budget(block._compiled_call_impl, memory_budget)
    return model


def _with_memory_budget(compiled, budget: float):
    """``compiled`` (a block's compiled call), compiling under the activation memory budget ``budget``.
    The compiler reads the budget when it splits a forward from its backward: on the first call, and
    on any later one that compiles again (new shapes)."""
    from torch._functorch import config as functorch_config

    def call(*args, **kwargs):
        with functorch_config.patch(activation_memory_budget=budget):
            return compiled(*args, **kwargs)

    call.memory_budget = budget
    return call


# ------------------------------------------------------------------ CUDA graphs
@contextlib.contextmanager
def same_mask_path(model: nn.Module, inputs: dict):
    """While a step is recorded (and while it is warmed up for recording): the attention mask takes one
    path, whatever the values in the batch.

    Hugging Face ``transformers`` cannot look at tensor values while a CUDA graph records (that would
    wait for the GPU). Outside a recording it looks: a causal batch without padding gets no mask at all
    (the attention's causal flag does the work), a padded batch a full mask. Inside a recording it gives
    up the shortcut and builds a full mask. Compiled decoder layers warmed up on one path and recorded on
    the other would be compiled again inside the recording, which fails. This makes the two paths one,
    for models with PyTorch's ``sdpa`` attention (other models keep transformers' own path):

    * a batch with no ``attention_mask`` and no ``position_ids`` (nothing to mask beyond causality)
      gets no mask, recorded or not;
    * a batch with an ``attention_mask`` gets the full mask, recorded or not (even when it happens to
      hold no padding), so a recorded step serves padded and unpadded batches of its shape alike.
    """
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    masks = None
    if implementation == "sdpa" and "position_ids" not in inputs:
        try:
            from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS as masks
        except ImportError:  # not a transformers model, or a transformers without this registry
            masks = None
    if masks is None:
        yield
        return
    original = masks["sdpa"]
    saved = masks._local_mapping.get("sdpa")
    padded = "attention_mask" in inputs

    def one_path(**kwargs):
        if padded:
            # never the shortcut: it reads the mask's values (transformers checks the packing of the
            # positions too outside a recording; the batch has no position_ids, so they are 0, 1, 2, ...)
            return original(**{**kwargs, "allow_is_causal_skip": False})
        if kwargs.get("attention_mask") is None and kwargs.get("local_size") is None and \
                kwargs["q_length"] == kwargs["kv_length"]:
            return None  # causality alone, which the attention's causal flag gives
        return original(**kwargs)

    masks["sdpa"] = one_path
    try:
        yield
    finally:
        if saved is None:
            del masks["sdpa"]
        else:
            masks["sdpa"] = saved


@contextlib.contextmanager
def recording_like_warmup(model: nn.Module, inputs: dict):
    """While a step is recorded: the model's Python takes the path it took in the warm-up, and anything
    that would compile instead raises ``torch._dynamo.exc.RecompileError``.

    The attention mask is the usual cause of a changed path (``same_mask_path``, which this applies;
    for a batch without ``attention_mask`` the warm-up needs no help, since outside a recording such a
    batch already gets no mask). The error covers recompiling what the warm-up compiled, which is what
    a changed path causes; a compiled function that the warm-up never called would be compiled for the
    first time, which this does not catch (the warm-up runs the same step, so every compiled region has
    run before).
    """
    with same_mask_path(model, inputs), torch._dynamo.config.patch(error_on_recompile=True):
        yield


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
        if fused_options(model).get("offload"):
            raise ValueError(f"{OFFLOAD_NOT_RECORDABLE}; fuse it with offload=False to record the step")
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
        with torch.cuda.stream(side), same_mask_path(model, self.inputs):
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


# ------------------------------------------------------------------ the recorded step inside a Trainer
RECORDABLE_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")  # TrainingArguments.optim values it can stand for


class LearningRateIntoTensors:
    """A ``Trainer``'s learning-rate scheduler, run on float copies of the rates; after each step the
    rates are written into the optimizer's learning-rate tensors, which a recorded step reads from GPU
    memory. (A float rate would be baked into the recording, and the schedule would do nothing.)

    The float copies are what the Trainer logs, so reading the rate never waits for the GPU.
    """

    def __init__(self, scheduler, optimizer):
        self.scheduler, self.optimizer = scheduler, optimizer
        self.write()

    def write(self) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"].fill_(lr)

    def step(self, *args, **kwargs) -> None:
        # the float copies' optimizer steps first, as PyTorch expects of a scheduler's optimizer (its
        # parameter has no gradient: nothing moves)
        self.scheduler.optimizer.step()
        self.scheduler.step(*args, **kwargs)
        self.write()

    def get_last_lr(self) -> list[float]:
        return self.scheduler.get_last_lr()

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)
        self.write()

    def __getattr__(self, name):
        return getattr(self.scheduler, name)


class _ReplayingAdamW(torch.optim.AdamW):
    """AdamW whose ``step()`` replays the recorded update (clip, AdamW, zero the gradients) once there is one.

    The Trainer calls ``optimizer.step()`` after the last micro-batch of each step, as always.
    """

    update = None  # set by the recorded step

    def step(self, closure=None):
        if self.update is None:
            return super().step(closure)
        self.update()
        return None


class RecordedStep:
    """The fast step's two pieces, as two CUDA graphs sharing one memory pool (or run as they are, with
    ``record=False``):

    * ``micro(batch, num_items)``: a micro-batch's forward, loss and backward, the gradients added into
      fixed buffers (so accumulation over micro-batches works inside the recording);
    * ``update()``: clip the gradients to ``max_grad_norm``, AdamW's step at the learning rate held in
      the optimizer's tensors, the buffers zeroed for the next step. The gradient norm before clipping
      is kept in ``grad_norm``.

    Warm-up steps run before recording (they compile and create the optimizer's state); then the
    trainable parameters and the optimizer's state are put back as they were, so the recorded run
    starts from the same point as an ordinary one. A micro-batch of another shape than the recorded
    one runs unrecorded into the same buffers, with a warning.
    """

    def __init__(self, trainer, model, batch: dict, num_items, record: bool = True, warmup: int = 2):
        self.trainer, self.model, self.record = trainer, model, record
        self.optimizer = optimizer = _raw_optimizer(trainer.optimizer)
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.grads = [torch.zeros_like(p) for p in self.params]
        self.max_norm = trainer.args.max_grad_norm or 0.0
        self.uses_items = num_items is not None
        self.scaled = _loss_scaled_for_accumulation(trainer, num_items)
        self.inputs = {k: v.detach().clone() for k, v in batch.items()}
        self.items = torch.as_tensor(num_items, device=self.params[0].device).clone() if self.uses_items else None
        self.divisor = torch.ones((), device=self.params[0].device)
        self.warned_shapes: set = set()
        self.grad_norm = torch.zeros((), device=self.params[0].device)
        self.has_grad = None  # which parameters the loss reaches, from the first backward
        if not record:
            optimizer.update = self._update_eager
            return
        self._record(batch, num_items, warmup)

    # -- the two bodies (what is recorded, and what runs unrecorded)
    def _micro_body(self, inputs, items, divisor):
        trainer = self.trainer
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(self.model, dict(inputs), num_items_in_batch=items)
        if not self.scaled:
            loss = loss / divisor
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        if self.has_grad is None:  # a parameter the loss does not reach gets no gradient, as in the Trainer
            self.has_grad = [g is not None for g in grads]
        pairs = [(b, g) for b, g in zip(self.grads, grads) if g is not None]
        torch._foreach_add_([b for b, _ in pairs], [g for _, g in pairs])
        return loss.detach()

    def _update_body(self):
        for p, g, used in zip(self.params, self.grads, self.has_grad or [True] * len(self.params)):
            p.grad = g if used else None  # AdamW and the clipping skip a parameter without a gradient
        limit = self.max_norm if self.max_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, limit)
        torch.optim.AdamW.step(self.optimizer)
        torch._foreach_zero_(self.grads)
        return norm

    def _update_eager(self):
        self.grad_norm.copy_(self._update_body())

    # -- recording
    def _record(self, batch, num_items, warmup):
        if warmup < 1:
            raise ValueError(f"warmup must be at least 1 (kernels and compilation must exist before recording), got {warmup}")
        with torch.no_grad():  # what the warm-up changes, to put back (a resumed run's AdamW state included)
            saved = [p.detach().clone() for p in self.params]
            saved_state = {p: {k: v.clone() for k, v in state.items() if torch.is_tensor(v)}
                           for p, state in self.optimizer.state.items()}
        rng = torch.cuda.get_rng_state()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), same_mask_path(self.model, self.inputs):
            for _ in range(warmup):
                self._micro_body(self.inputs, self.items, self.divisor)
                self._update_body()
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():  # back to where an ordinary run starts: the warm-up trained on one batch
            for p, s in zip(self.params, saved):
                p.copy_(s)
            for p, state in self.optimizer.state.items():
                before = saved_state.get(p, {})
                for key, value in state.items():
                    if not torch.is_tensor(value):
                        continue
                    if key in before:  # as it was (a resumed run's state)
                        value.copy_(before[key])
                    else:  # as a fresh AdamW starts: zero moments, step 0
                        value.zero_()
            torch._foreach_zero_(self.grads)
        torch.cuda.set_rng_state(rng)  # the warm-up's random draws (dropout) are not the run's
        del saved, saved_state
        generator = torch.cuda.default_generators[torch.cuda.current_device()]
        before = generator.clone_state()
        self.micro_graph, self.update_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        try:
            with recording_like_warmup(self.model, self.inputs):
                with torch.cuda.graph(self.micro_graph, capture_error_mode="thread_local"):
                    self.loss = self._micro_body(self.inputs, self.items, self.divisor)
                with torch.cuda.graph(self.update_graph, pool=self.micro_graph.pool(), capture_error_mode="thread_local"):
                    self.grad_norm = self._update_body()
        except Exception as exc:
            generator.graphsafe_set_state(before)  # a failed recording leaves the generator capturing
            if isinstance(exc, torch._dynamo.exc.RecompileError):
                raise RuntimeError(
                    "recording the training step would recompile the compiled model (a CUDA graph cannot "
                    f"record compilation): the step took another path than in the warm-up ({exc})") from exc
            raise
        self.optimizer.update = self.update_graph.replay

    # -- one micro-batch
    def micro(self, batch: dict, num_items) -> torch.Tensor:
        if set(batch) != set(self.inputs) or (num_items is not None) != self.uses_items:
            raise ValueError(f"the recorded step takes {sorted(self.inputs)}"
                             f"{' and a token count' if self.uses_items else ''}, got {sorted(batch)}")
        divisor = getattr(self.trainer, "current_gradient_accumulation_steps", self.trainer.args.gradient_accumulation_steps)
        shapes = {k: tuple(v.shape) for k, v in batch.items()}
        if not self.record or any(shapes[k] != tuple(v.shape) for k, v in self.inputs.items()):
            if self.record and tuple(shapes.items()) not in self.warned_shapes:
                self.warned_shapes.add(tuple(shapes.items()))
                recorded = {k: tuple(v.shape) for k, v in self.inputs.items()}
                warnings.warn(f"FastTrainer: a batch of shape {shapes} differs from the recorded {recorded}; "
                                    "it runs as an ordinary (unrecorded) micro-batch. Pad every batch to one "
                                    "shape (make_fast_trainer's max_length) or drop the last, shorter batch "
                                    "(dataloader_drop_last=True) to keep every step recorded.", stacklevel=3)
            items = None if num_items is None else torch.as_tensor(num_items, device=self.params[0].device)
            return self._micro_body(batch, items, torch.tensor(float(divisor), device=self.params[0].device))
        for k, v in batch.items():
            self.inputs[k].copy_(v, non_blocking=True)
        if self.uses_items:
            self.items.copy_(torch.as_tensor(num_items), non_blocking=True)
        if not self.scaled:
            self.divisor.fill_(divisor)
        self.micro_graph.replay()
        return self.loss


def _raw_optimizer(optimizer):
    """The optimizer itself, under accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def _loss_scaled_for_accumulation(trainer, num_items) -> bool:
    """Whether the Trainer's loss already counts the whole accumulated step (as ``training_step`` decides)."""
    if getattr(trainer, "loss_is_scaled_for_ga", None) is not None:
        return trainer.loss_is_scaled_for_ga
    return bool((trainer.model_accepts_loss_kwargs and num_items is not None) or trainer.compute_loss_func is not None)


class FastTrainer(Trainer):
    """A ``Trainer`` whose training step is compiled and recorded as CUDA graphs, and that still
    behaves as a Trainer: the scheduler's learning rate takes effect, gradients are clipped to
    ``max_grad_norm``, gradient accumulation works, the loss is logged without waiting for the GPU
    at every step, and evaluation and checkpoints work as usual.

    What it changes, and why:

    * the optimizer is PyTorch's AdamW with ``capturable=True`` and learning rates held in tensors
      (``args.optim`` must be ``adamw_torch`` or ``adamw_torch_fused``, which it stands for); the
      scheduler runs on floats and writes each new rate into those tensors
      (``LearningRateIntoTensors``);
    * each micro-batch replays one graph (forward, loss, backward into fixed gradient buffers),
      and the optimizer step replays another (clip, AdamW, zero the buffers): ``RecordedStep``;
    * ``logging_nan_inf_filter`` is off (the Trainer's filter reads every loss on the host, which
      waits for the GPU; a nan or inf loss is logged as it is), and batches are copied to the GPU
      without blocking.

    It trains with the ordinary Trainer step (compiled, on a GPU), after one warning that says why,
    where a recording cannot apply: no CUDA GPU, fp16 mixed precision (its loss scaler reads the GPU
    on the host every step), gradient checkpointing, activations offloaded to the host, an optimizer
    given from outside, another ``optim``, or the ``reduce_lr_on_plateau`` schedule. After each step the Trainer sets every
    ``p.grad`` to None as usual; the recorded gradients live in the step's own buffers, so a callback
    that reads ``p.grad`` sees None.
    Checkpoints of a model with ``Qlora_4_bit`` layers hold its adapter (``adapters.save_adapter``).
    ``record=False`` runs the same pieces unrecorded, on any device: the fast step's arithmetic,
    to check it. ``compile=True`` compiles the decoder blocks first (``compile_for_training``).
    """

    def __init__(self, *args, record: bool = True, compile: bool = True, warmup: int = 2, **kwargs):
        if warmup < 1:
            raise ValueError(f"warmup must be at least 1 step before recording, got {warmup}")
        train_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if train_args is not None:
            train_args = copy.deepcopy(train_args)  # the caller's arguments stay as they were
            train_args.logging_nan_inf_filter = False
            if torch.cuda.is_available() and not train_args.use_cpu:
                train_args.accelerator_config.non_blocking = True
            if "args" in kwargs:
                kwargs["args"] = train_args
            else:
                args = (args[0], train_args, *args[2:])
        self.given_optimizer = (kwargs.get("optimizers") or (None, None))[0] is not None
        super().__init__(*args, **kwargs)
        self.record, self.compile, self.warmup = record, compile, warmup
        self.step_engine = None
        self.why_ordinary = None  # the reason the ordinary step runs, once decided
        self._decided = self._compiled = False

    # -- where a recording applies
    def _decide(self, model=None) -> bool:
        """True where the fast step runs; otherwise warns once and trains with the ordinary step."""
        if self._decided:
            return self.why_ordinary is None
        model = model if model is not None else self.model
        device = next(model.parameters()).device
        optim = getattr(self.args.optim, "value", self.args.optim)
        reason = None
        if self.given_optimizer:
            reason = "an optimizer was given to the Trainer (the fast step builds its own capturable AdamW)"
        elif optim not in RECORDABLE_OPTIMIZERS:
            reason = (f"optim={optim!r}: a recorded step needs PyTorch's AdamW with capturable=True; "
                      f"use optim='adamw_torch'")
        elif getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type) == "reduce_lr_on_plateau":
            reason = ("lr_scheduler_type='reduce_lr_on_plateau' steps on evaluation metrics, which the recorded "
                      "step's rate tensors are not written from; use another schedule")
        elif self.args.fp16:
            reason = ("fp16 mixed precision: its loss scaler reads the GPU on the host every step; use bf16 "
                      "(or float32) to record the step")
        elif checkpointing_on(model, self.args):
            reason = "gradient checkpointing is on; the recorded step runs without it"
        elif fused_options(model).get("offload"):
            reason = OFFLOAD_NOT_RECORDABLE
        elif self.record and device.type != "cuda":
            reason = f"the model is on {device.type}, and CUDA graphs need a CUDA GPU"
        self.why_ordinary, self._decided = reason, True
        if reason is not None:
            warnings.warn(f"FastTrainer trains with the ordinary Trainer step: {reason}.", stacklevel=3)
        return reason is None

    def create_optimizer(self, model=None):
        if self.optimizer is not None or not self._decide(model):
            return super().create_optimizer(model) if self.optimizer is None else self.optimizer
        model = model if model is not None else self.model
        device = next(model.parameters()).device
        decay = set(self.get_decay_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                  {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        for g in groups:
            g["lr"] = torch.tensor(float(self.args.learning_rate), device=device)
        # a tensor rate needs capturable=True or foreach=False (on a CPU, where nothing is recorded)
        on_gpu = device.type == "cuda"
        self.optimizer = _ReplayingAdamW(groups, lr=self.args.learning_rate,
                                         betas=(self.args.adam_beta1, self.args.adam_beta2),
                                         eps=self.args.adam_epsilon, capturable=on_gpu, foreach=on_gpu)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is not None or not self._decide() or self.given_optimizer:
            return super().create_scheduler(num_training_steps, optimizer)
        real = _raw_optimizer(optimizer if optimizer is not None else self.optimizer)
        shadow = torch.optim.SGD([{"params": [torch.zeros(1)], "lr": float(self.args.learning_rate)}
                                  for _ in real.param_groups])
        super().create_scheduler(num_training_steps, optimizer=shadow)
        self.lr_scheduler = LearningRateIntoTensors(self.lr_scheduler, real)
        return self.lr_scheduler

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self._decide(model):
            if self.compile and not self._compiled and next(model.parameters()).is_cuda:
                compile_for_training(_unwrapped(model))  # the ordinary step, compiled as chapter 8 does
                self._compiled = True
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        inputs = self._prepare_inputs(inputs)
        if self.step_engine is None:
            if self.compile and self.record and not self._compiled:
                compile_for_training(_unwrapped(model))
                self._compiled = True
            self.step_engine = RecordedStep(self, model, inputs, num_items_in_batch, record=self.record,
                                            warmup=self.warmup)
        return self.step_engine.micro(inputs, num_items_in_batch)

    def _save(self, output_dir=None, state_dict=None):
        """A checkpoint of a model with ``Qlora_4_bit`` layers holds its adapter, in the book's format
        (``adapters.save_adapter``: the LoRA matrices and the base's settings), beside the Trainer's
        optimizer, scheduler and state as usual: ``save_pretrained`` cannot save such a model (it would
        come back with those layers initialised at random). Other models save as the Trainer does."""
        from .adapters import lora_layers, save_adapter

        model = _unwrapped(self.model)
        if not lora_layers(model):
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        save_adapter(model, output_dir)
        torch.save(self.args, f"{output_dir}/training_args.bin")

    def _clip_grad_norm(self, model):
        if self.step_engine is None:
            return super()._clip_grad_norm(model)
        return self.step_engine.grad_norm  # filled in by the update, which optimizer.step() runs next

    def _get_grad_norm(self, model, grad_norm=None):
        if self.step_engine is None:
            return super()._get_grad_norm(model, grad_norm)
        return self.step_engine.grad_norm



def _unwrapped(model):
    return getattr(model, "module", model)


def make_fast_trainer(model, args, train_dataset, pad_token_id: int, eval_dataset=None, max_length: int | None = None,
                      optimizers=(None, None), **options):
    """``train.make_trainer`` with ``FastTrainer``: every batch padded to ``max_length`` tokens (default:
    the longest row of the training and evaluation data), so every step has the recorded shape.
    ``options`` go to ``FastTrainer`` (``record``, ``compile``, ``warmup``)."""
    if max_length is None:
        lengths = [len(ids) for data in (train_dataset, eval_dataset) if data is not None for ids in data["input_ids"]]
        max_length = max(lengths)
    return make_trainer(model, args, train_dataset, pad_token_id, optimizers=optimizers, eval_dataset=eval_dataset,
                        pad_to=max_length, trainer_class=lambda **kw: FastTrainer(**kw, **options))

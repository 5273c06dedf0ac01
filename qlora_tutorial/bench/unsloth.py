"""Our QLoRA step beside Unsloth's and PEFT's, in one run on one GPU, on the same saved random weights.

    python -m qlora_tutorial.bench.unsloth --models tinyllama,llama3-8b --json unsloth_comparison.json

The parent saves each architecture's random weights once (with a small word-level tokenizer, which
Unsloth's loader wants), then runs every implementation in a process of its own: Unsloth must be
imported before ``transformers`` and patches it, and a process of its own also gives each its own
memory. Each process prints its rows as JSON lines; the parent collects them.

What a row holds (``ROW_KEYS``): the wall-clock per step (median of the timed steps), the GPU-busy
time per step (the profiler's kernel time, ``profiling.gpu_busy_ms``, in the first round), and the
peak memory allocated while training, weights included (every process holds one model, so peaks
compare directly; the first round's), and the GPU-busy time by what the kernels do
(``gpu_ms_by_kind``: ``profiling.kernel_kind``). Every setup runs its steps in ``rounds`` rounds, the setups of
a process interleaved; a row gives the median round's wall-clock and every round's.

Our setups (``fusions``): ``graph`` (compiled decoder layers, the step recorded as a CUDA graph:
``fast.CapturedStep``), ``chunked_loss`` (``fused.fuse``), ``offload`` (activations kept on the host,
``fused.fuse(offload=True)``; eager, since a graph cannot record it), ``budget`` (the layers compiled
with ``memory_budget=BUDGET``: the compiler computes the cheapest activations again in the backward
instead of keeping them; with ``graph``, without checkpointing), ``compile`` (the layers compiled, the
step eager: with ``offload``, which a graph cannot record), ``swiglu`` (``fused.SwiGLU`` in every MLP,
eager). Each fusion also runs without the others it is measured against, so the rows give what each
saves on its own.

``--trace-peaks``: each eager setup with checkpointing, Unsloth's and PEFT's included, runs once more
with the allocator's history recorded, and ``peak_traces`` in the record says what the step's own
allocations were at their highest point, by the code that made them (``trace_peak``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .results import GIB
from .step import _allocated, _free, _sync, median_step_s, train_step
from .suite import TARGETS, save_random_model

R, ALPHA = 16, 32
BUDGET = 0.8  # fast.compile_for_training(memory_budget=...) of the "budget" setups
ROW_KEYS = ("model", "shape", "grad_ckpt", "implementation", "fusions", "wall_ms", "gpu_ms", "peak_gib")
SHAPES = {"tinyllama": [(4, 512), (4, 2048)], "llama3-8b": [(1, 2048)], "tiny": [(2, 16)]}
DEVICE = torch.device("cuda")  # the tests run the setups on the CPU ("tiny" model, no graphs, no Unsloth)


def save_model(name: str, folder: Path) -> Path:
    """``name``'s architecture (``models.training_config``) with random bf16 weights, and a word-level
    tokenizer (Unsloth's loader wants one), saved in ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ..models import training_config

    config = training_config(name)
    save_random_model(config, folder, torch.bfloat16, DEVICE)
    words = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(252)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>", model_max_length=config.max_position_embeddings).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------ timing one setup
def timed(step, steps: int, profile_steps: int) -> tuple[float, float | None, dict | None]:
    """Median wall-clock ms of ``steps`` steps (the GPU synchronised around each), GPU-busy ms per step,
    and that time by kind of kernel."""
    from .profiling import gpu_busy_ms

    wall = median_step_s(step, steps, DEVICE) * 1000
    busy, kinds = gpu_busy_ms(step, profile_steps, DEVICE, by_kind=True) if profile_steps else (None, None)
    return wall, busy, kinds


PACKAGES = ("qlora_tutorial", "transformers", "unsloth_zoo", "unsloth", "peft", "bitsandbytes", "torch")


def _where(frames) -> str:
    """The code that made an allocation: its innermost Python frame in a library or in this package
    (the bench's own frames only where there is nothing else: a built-in backward)."""
    def short(f):  # from the package's folder on: "transformers/models/llama/modeling_llama.py:64 forward"
        name = f["filename"].replace("\\", "/")
        found = [name.find(f"/{pkg}/") for pkg in PACKAGES if f"/{pkg}/" in name]
        return f"{name[min(found) + 1:] if found else name}:{f['line']} {f['name']}"
    libraries = [f"/{pkg}/" for pkg in PACKAGES if pkg != "torch"] + ["/torch/optim/", "/torch/utils/checkpoint"]
    for f in frames:
        if any(k in f["filename"] for k in libraries) and "/qlora_tutorial/bench/" not in f["filename"]:
            return short(f)
    for f in frames:
        if "/qlora_tutorial/bench/" in f["filename"]:
            return short(f)
    return short(frames[0]) if frames else "(no Python frame)"


def trace_peak(prepare, steps: int) -> dict:
    """``prepare()`` and ``steps`` steps once more, with the allocator's history recorded: the highest
    point of what they allocated (above what was allocated before), the allocation that reached it, and
    what was alive then, by the code that allocated it (``_where``), largest first."""
    _free(DEVICE, workspaces=True)
    torch.cuda.memory._record_memory_history(context="alloc", stacks="python", max_entries=4_000_000,
                                            clear_history=True)
    try:
        step, cleanup = prepare()
        for _ in range(steps):
            step()
        _sync(DEVICE)
        trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    cleanup()
    step = cleanup = None
    _free(DEVICE, workspaces=True)
    return {**peak_of(trace), "steps": steps}


def peak_of(trace: list[dict]) -> dict:
    """What ``trace_peak`` says of an allocator history (``torch.cuda.memory._snapshot()``'s events of
    one device): allocations ("alloc") and frees ("free_completed"), each with its address, size and
    Python frames."""
    events = [e for e in trace if e["action"] in ("alloc", "free_completed")]
    live, now, top, at = {}, 0, 0, -1
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            live[e["addr"]] = e
            now += e["size"]
        elif e["addr"] in live:
            now -= live.pop(e["addr"])["size"]
        if now > top:
            top, at = now, i
    live = {}
    for e in events[:at + 1]:  # again, to the highest point
        if e["action"] == "alloc":
            live[e["addr"]] = e
        else:
            live.pop(e["addr"], None)
    groups = {}
    for e in live.values():
        where = _where(e.get("frames", []))
        n, size = groups.get(where, (0, 0))
        groups[where] = (n + 1, size + e["size"])
    reached = events[at] if at >= 0 else None
    return {"peak_gib": round(top / GIB, 4), "events": len(trace),
            "at": None if reached is None else {"where": _where(reached.get("frames", [])),
                                                "mib": round(reached["size"] / 2**20, 2)},
            "live": [{"where": w, "mib": round(size / 2**20, 2), "tensors": n}
                     for w, (n, size) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:15]]}


def run_setups(setups, model_name, rounds, steps, warmup, emit, model_bytes=None, trace=False):
    """``setups``: (shape, grad_ckpt, implementation, fusions, prepare) with ``prepare()`` -> (step, cleanup).
    Each round prepares every setup afresh (peak memory measured from there), warms it up and times it.

    ``model_bytes``: what the GPU held once the model was built. Memory still allocated beyond it
    when a setup starts (an earlier setup's leftovers: compiled code, a recording's pool) is taken off
    that setup's peak, and its size recorded (``leftover_gib``), so each peak is the model's plus the
    setup's own. ``trace``: every setup with checkpointing that is not recorded as a graph also goes
    through ``trace_peak`` (warm-up steps and one more), emitted as a ``peak_trace``."""
    results = {i: {"wall": [], "gpu": [], "peak": [], "left": [], "kinds": None} for i in range(len(setups))}
    for k in range(rounds):
        for i, (shape, ckpt, impl, fusions, prepare) in enumerate(setups):
            name = f"{model_name} {shape[0]}x{shape[1]} ckpt={ckpt} {impl} {label(fusions)}"
            try:
                _free(DEVICE, workspaces=True)
                left = 0
                if DEVICE.type == "cuda":
                    left = max(0, _allocated(DEVICE) - model_bytes) if model_bytes is not None else 0
                    torch.cuda.reset_peak_memory_stats()
                step, cleanup = prepare()
                for _ in range(warmup):
                    loss = step()
                _sync(DEVICE)
                if not torch.isfinite(loss):
                    raise RuntimeError(f"the loss is {float(loss)}")
                wall, busy, kinds = timed(step, steps, 3 if k == 0 else 0)
                peak = (torch.cuda.max_memory_allocated() - left) / GIB if DEVICE.type == "cuda" else None
                cleanup()
                step = cleanup = loss = None  # a recorded step's memory pool goes with it, before the next setup
            except Exception as exc:  # recorded, and the other setups go on
                step = cleanup = loss = None
                emit({"failure": name, "round": k, "error": f"{type(exc).__name__}: {exc}"[:800]})
                _free(DEVICE, workspaces=True)
                continue
            r = results[i]
            r["wall"].append(wall)
            if peak is not None:
                r["peak"].append(peak)
                r["left"].append(left / GIB)
            if busy is not None:
                r["gpu"].append(busy)
                r["kinds"] = r["kinds"] or {kind: round(ms, 2) for kind, ms in kinds.items()}
            print(f"[{name}] round {k}: {wall:.1f} ms wall, {busy or float('nan'):.1f} ms GPU, {peak or 0:.2f} GiB",
                  file=sys.stderr, flush=True)
    for i, (shape, ckpt, impl, fusions, _) in enumerate(setups):
        r = results[i]
        if not r["wall"]:
            continue
        emit({"model": model_name, "shape": f"{shape[0]}x{shape[1]}", "grad_ckpt": ckpt, "implementation": impl,
              "fusions": list(fusions), "wall_ms": round(statistics.median(r["wall"]), 2),
              "wall_ms_rounds": [round(w, 2) for w in r["wall"]],
              "gpu_ms": round(statistics.median(r["gpu"]), 2) if r["gpu"] else None,
              "gpu_ms_by_kind": r["kinds"],
              # the first round's peak, less what earlier setups left allocated (``leftover_gib_rounds``)
              "peak_gib": round(r["peak"][0], 3) if r["peak"] else None,
              "peak_gib_rounds": [round(p, 3) for p in r["peak"]],
              "leftover_gib_rounds": [round(g, 3) for g in r["left"]],
              # what the process held once the model was built: weights, quantization state, adapters
              "model_gib": round(model_bytes / GIB, 3) if model_bytes is not None else None})
    for shape, ckpt, impl, fusions, prepare in setups:
        if not (trace and ckpt and "graph" not in fusions and DEVICE.type == "cuda"):
            continue
        try:
            found = trace_peak(prepare, warmup + 1)
        except Exception as exc:
            emit({"failure": f"{model_name} {shape[0]}x{shape[1]} {impl} {label(fusions)} trace",
                  "error": f"{type(exc).__name__}: {exc}"[:800]})
            continue
        emit({"peak_trace": {"model": model_name, "shape": f"{shape[0]}x{shape[1]}", "grad_ckpt": ckpt,
                             "implementation": impl, "fusions": list(fusions), **found}})


# ------------------------------------------------------------------ the chunked loss alone, chunk by chunk
CHUNK_MIBS = (None, 256, 128, 64, 32)  # None: transformers' loss, all the logits at once


def loss_chunk_rows(model_name, config, shapes, steps, emit, chunk_mibs=CHUNK_MIBS):
    """The head and the loss alone, forward and backward, on random hidden states of each shape's
    tokens, with ``model_name``'s hidden size and vocabulary (bf16, a frozen head): transformers'
    ``ForCausalLMLoss`` (``chunk_mib`` None), then ``fused.causal_lm_loss`` with each chunk size.
    A row gives the loss, the GPU-busy and wall-clock ms, and the peak memory above the inputs."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    from ..fused import causal_lm_loss, chunk_tokens_for

    g = torch.Generator(DEVICE).manual_seed(0)
    weight = torch.randn(config.vocab_size, config.hidden_size, device=DEVICE, dtype=torch.bfloat16,
                         generator=g) * 0.02
    for batch, seq in shapes:
        hidden = torch.randn(batch, seq, config.hidden_size, device=DEVICE, dtype=torch.bfloat16, generator=g)
        labels = torch.randint(0, config.vocab_size, (batch, seq), device=DEVICE, generator=g)
        for mib in chunk_mibs:
            tokens = None if mib is None else chunk_tokens_for(config.vocab_size, mib * 2**20)
            h = hidden.detach().requires_grad_()

            def step():
                h.grad = None
                if tokens is None:
                    loss = ForCausalLMLoss(h @ weight.t(), labels, config.vocab_size)
                else:
                    loss = causal_lm_loss(h, weight, labels, chunk_tokens=tokens)
                loss.backward()
                return loss
            _free(DEVICE, workspaces=True)
            step()  # warm-up
            before = _allocated(DEVICE) if DEVICE.type == "cuda" else None
            if before is not None:
                torch.cuda.reset_peak_memory_stats()
            wall, busy, _ = timed(step, steps, 3)
            peak = (torch.cuda.max_memory_allocated() - before) / GIB if before is not None else None
            emit({"loss_chunk": {"model": model_name, "shape": f"{batch}x{seq}", "vocab": config.vocab_size,
                                 "chunk_mib": mib, "chunk_tokens": tokens, "loss": float(step().detach()),
                                 "wall_ms": round(wall, 3),
                                 "gpu_ms": None if busy is None else round(busy, 3),
                                 "peak_gib": None if peak is None else round(peak, 4)}})
        h = hidden = labels = None
    weight = None
    _free(DEVICE, workspaces=True)


# ------------------------------------------------------------------ the implementations, each in its own process
def label(fusions) -> str:
    """A setup's name on the command line (``--setups``): its fusions joined by "+", "none" for none."""
    return "+".join(fusions) or "none"


def child_ours(folder, model_name, shapes, ckpts, rounds, steps, warmup, emit, only=None, loss_chunks=True,
               trace=False):
    """Our setups on one model. ``only``: the names (``label``) of the setups to run; every setup where
    None. ``loss_chunks``: first the chunked loss on its own (``loss_chunk_rows``)."""
    from transformers import AutoModelForCausalLM

    from .. import fast, fused
    from ..quantize import quantize_model
    from ..train import set_checkpointing

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map={"": str(DEVICE)},
                                                 attn_implementation="sdpa")
    model.config.use_cache = False
    quantize_model(model, TARGETS, ALPHA, R, compute_dtype=torch.bfloat16)
    model.train()
    if loss_chunks:
        loss_chunk_rows(model_name, model.config, shapes, steps, emit)
    _free(DEVICE, workspaces=True)
    model_bytes = _allocated(DEVICE)
    compiled = []  # the memory budget the layers are compiled with, once they are

    def setup(shape, ckpt, fusions):
        def prepare():
            fused.unfuse(model)
            if {"chunked_loss", "offload", "swiglu"} & set(fusions):
                fused.fuse(model, chunked_loss="chunked_loss" in fusions, offload="offload" in fusions,
                           swiglu="swiglu" in fusions)
            set_checkpointing(model, ckpt)
            ids = torch.randint(0, model.config.vocab_size, shape, device=DEVICE,
                                generator=torch.Generator(DEVICE).manual_seed(0))
            params = [p for p in model.parameters() if p.requires_grad]
            if "graph" in fusions or "compile" in fusions:
                budget = BUDGET if "budget" in fusions else None
                if compiled != [budget]:
                    torch._dynamo.reset()
                    fast.compile_for_training(model, memory_budget=budget)
                    compiled[:] = [budget]
            if "graph" in fusions:
                optimizer = torch.optim.AdamW(params, lr=1e-5, capturable=True)
                captured = fast.CapturedStep(model, optimizer, warmup=2, input_ids=ids, labels=ids)
                step = lambda: captured(input_ids=ids, labels=ids)  # noqa: E731
            else:
                optimizer = torch.optim.AdamW(params, lr=1e-5)
                step = lambda: train_step(model, optimizer, ids)  # noqa: E731

            def cleanup():
                nonlocal optimizer
                for p in params:
                    p.grad = None
                del optimizer
                _sync(DEVICE)
            return step, cleanup
        return prepare

    setups = []
    for shape in shapes:
        for ckpt in ckpts:
            choices = [("graph", "chunked_loss"), ("graph",), ("chunked_loss",), (), ("chunked_loss", "swiglu")]
            if ckpt:
                choices += [OFFLOADED, SWIGLU_OFFLOADED, COMPILED_OFFLOADED]
            else:
                choices.append(BUDGETED)
            for fusions in choices:
                if only is None or label(fusions) in only:
                    setups.append((shape, ckpt, "ours", fusions, setup(shape, ckpt, fusions)))
    # the eager setups first, in rounds of their own: compiling the layers for the graphs changes every
    # later step of this model
    run_setups([s for s in setups if not {"graph", "compile"} & set(s[3])], model_name, rounds, steps, warmup, emit,
               model_bytes, trace)
    for budgeted in (False, True):  # compiled with one budget, then with the other
        run_setups([s for s in setups if {"graph", "compile"} & set(s[3]) and ("budget" in s[3]) == budgeted],
                   model_name, rounds, steps, warmup, emit, model_bytes, trace)


def child_peft(folder, model_name, shapes, ckpts, rounds, steps, warmup, emit, trace=False):
    """PEFT's QLoRA (``suite.build("qlora", "peft")``: bitsandbytes' NF4 with double quantization, float32
    adapters) in a process of its own: what another implementation leaves allocated would otherwise
    count in its peaks."""
    from ..train import set_checkpointing
    from .suite import build

    model = build("qlora", "peft", Path(folder), DEVICE, torch.bfloat16, r=R, alpha=ALPHA)
    model.train()
    _free(DEVICE, workspaces=True)
    model_bytes = _allocated(DEVICE)

    def setup(shape, ckpt):
        def prepare():
            set_checkpointing(model, ckpt)
            ids = torch.randint(0, model.config.vocab_size, shape, device=DEVICE,
                                generator=torch.Generator(DEVICE).manual_seed(0))
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
            return (lambda: train_step(model, optimizer, ids)), lambda: None
        return prepare
    run_setups([(shape, ckpt, "peft", (), setup(shape, ckpt)) for shape in shapes for ckpt in ckpts],
               model_name, rounds, steps, warmup, emit, model_bytes, trace)


def child_unsloth(folder, model_name, shapes, ckpts, rounds, steps, warmup, emit, trace=False):
    """Unsloth as its documentation shows: ``FastLanguageModel.from_pretrained(load_in_4bit=True)``, then
    ``get_peft_model``; its own checkpointing (``"unsloth"``: offloaded to the host) or none. Unsloth
    fixes checkpointing when it builds the adapters, so each setting gets its own model."""
    import unsloth  # noqa: F401  (before transformers, as Unsloth requires)
    from unsloth import FastLanguageModel

    longest = max(s for _, s in shapes)
    for ckpt in ckpts:
        model, _ = FastLanguageModel.from_pretrained(str(folder), max_seq_length=longest, dtype=torch.bfloat16,
                                                     load_in_4bit=True, local_files_only=True)
        model = FastLanguageModel.get_peft_model(model, r=R, lora_alpha=ALPHA, target_modules=TARGETS,
                                                 lora_dropout=0, bias="none", random_state=0,
                                                 use_gradient_checkpointing="unsloth" if ckpt else False)
        FastLanguageModel.for_training(model)
        _free(DEVICE, workspaces=True)
        model_bytes = _allocated(DEVICE)

        def setup(shape, m=model):
            def prepare():
                ids = torch.randint(0, m.config.vocab_size, shape, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
                optimizer = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
                return (lambda: train_step(m, optimizer, ids)), lambda: None
            return prepare
        run_setups([(shape, ckpt, "unsloth", (), setup(shape)) for shape in shapes], model_name, rounds, steps,
                   warmup, emit, model_bytes, trace)
        model = setup = None  # setup's default argument holds the model too: both go before the next is built
        _free(DEVICE, workspaces=True)


# ------------------------------------------------------------------ the targets
RECORDED = ("graph", "chunked_loss")  # our fastest step
OFFLOADED = ("chunked_loss", "offload")  # our eager step with checkpointing, activations on the host
SWIGLU_OFFLOADED = ("chunked_loss", "offload", "swiglu")  # the same with fused.SwiGLU
COMPILED_OFFLOADED = ("compile", "chunked_loss", "offload")  # the same with compiled layers
BUDGETED = ("graph", "chunked_loss", "budget")  # our smallest recorded step without checkpointing
MOONSHOT = ("llama3-8b", "1x8192", 15.0)  # the 8B architecture at 1x8192, checkpointing: under a T4's 15 GiB


def setup_rows(result: dict) -> dict[tuple, dict]:
    """A run's rows by setup: ``(model, shape, grad_ckpt, implementation, fusions)``, fusions a tuple."""
    return {(r["model"], r["shape"], r["grad_ckpt"], r["implementation"], tuple(r["fusions"])): r for r in result["rows"]}


def unsloth_targets(result: dict) -> list[dict]:
    """The targets of the fusion work, checked on one run's rows, at every model, shape and
    checkpointing setting it has: our recorded step's GPU-busy time at most 0.85 of Unsloth's; our
    peak memory at most Unsloth's (the smallest of our recorded step, the recorded step compiled with
    a memory budget, and the offloaded steps, eager or with compiled layers, where the run has them);
    our recorded step's wall-clock at most 1.10 times its own GPU-busy time; and where the run has it,
    ``MOONSHOT``: our smallest step with checkpointing of the 8B architecture at 1x8192 in under 15 GiB."""
    rows = setup_rows(result)
    out = []
    for (model, shape, ckpt, impl, fusions), theirs in sorted(rows.items()):
        if impl != "unsloth":
            continue
        ours = rows.get((model, shape, ckpt, "ours", RECORDED))
        if ours is None:
            continue
        where = f"{model} {shape}{' with checkpointing' if ckpt else ''}"
        smallest = min([ours] + [rows[k] for k in [(model, shape, ckpt, "ours", f) for f in (BUDGETED, OFFLOADED, SWIGLU_OFFLOADED,
                                                                                       COMPILED_OFFLOADED)]
                                 if k in rows], key=lambda r: r["peak_gib"])
        for name, value, limit in ((f"{where}: GPU-busy, ours / Unsloth", ours["gpu_ms"] / theirs["gpu_ms"], 0.85),
                                   (f"{where}: peak memory, ours / Unsloth", smallest["peak_gib"] / theirs["peak_gib"], 1.0),
                                   (f"{where}: our wall-clock / our GPU-busy", ours["wall_ms"] / ours["gpu_ms"], 1.10)):
            out.append({"target": name, "value": round(value, 3), "limit": limit, "ok": value <= limit})
    model, shape, limit = MOONSHOT
    ours = [r for (m, s, ckpt, impl, _), r in rows.items() if (m, s, ckpt, impl) == (model, shape, True, "ours")]
    if ours:
        value = min(r["peak_gib"] for r in ours)
        out.append({"target": f"{model} {shape} with checkpointing: our smallest peak, GiB", "value": round(value, 3),
                    "limit": limit, "ok": value < limit})
    return out


# ------------------------------------------------------------------ the parent
NOTES = {  # what a record's provenance says of how it was measured
    "processes": "each implementation in a process of its own, for each model (Unsloth must be imported before "
                 "transformers; and a process holds only its own memory)",
    "peak_gib": "the first round's peak allocated memory, weights included, less what earlier setups in the same "
                "process left allocated when the setup started (leftover_gib_rounds)",
    "model_gib": "what the process held once the model was built (weights, quantization state, adapters), before "
                 "any step",
    "loss_chunks": "the head and the loss alone (loss_chunk_rows), forward and backward on random hidden states of "
                   "each shape's tokens: transformers' ForCausalLMLoss (chunk_mib null), then the chunked loss; "
                   "peak_gib is the peak above the inputs",
    "gpu_ms": "the profiler's kernel time per step over 3 steps of the first round; gpu_ms_by_kind splits it by "
              "kernel name (profiling.kernel_kind)",
    "peak_traces": "with --trace-peaks: each eager setup with checkpointing once more (warm-up steps and one "
                   "more) with the allocator's history recorded (trace_peak): peak_gib above what was allocated "
                   "before, the allocation that reached it, and what was alive then by the code that allocated it",
    "workspaces": "cuBLAS's workspaces are freed before each model_gib and each setup (step._free), so every "
                  "setup's peak counts the workspace it allocates",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tinyllama,llama3-8b")
    parser.add_argument("--implementations", default="unsloth,ours,peft")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", required=True)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--ckpts", default="0,1")
    parser.add_argument("--shapes", help="batch x sequence for every model instead of SHAPES', e.g. 1x8192")
    parser.add_argument("--setups", help="only these of our setups (fusions joined by +, or none), e.g. "
                                         "chunked_loss+offload,none")
    parser.add_argument("--trace-peaks", action="store_true",
                        help="trace the allocations of each eager setup with checkpointing (peak_traces)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds one implementation's process may take")
    parser.add_argument("--append", action="store_true",
                        help="add this run's rows to --json's (a run on the same device), its command to the commands")
    args = parser.parse_args(argv)
    ckpts = [bool(int(c)) for c in args.ckpts.split(",")]
    if args.child:
        def emit(row):
            print("ROW " + json.dumps(row), flush=True)
        shapes = SHAPES[args.model] if not args.shapes else \
            [tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",")]
        extra = {"only": args.setups and set(args.setups.split(","))} if args.child == "ours" else {}
        extra["trace"] = args.trace_peaks
        run = {"unsloth": child_unsloth, "ours": child_ours, "peft": child_peft}[args.child]
        run(Path(args.folder), args.model, shapes, ckpts, args.rounds, args.steps, args.warmup, emit, **extra)
        return 0
    from .results import provenance, shown_command

    command = shown_command("python -m qlora_tutorial.bench.unsloth " + " ".join(argv or sys.argv[1:]))
    from ..device import versions

    record = {"provenance": {**provenance(DEVICE, command), "versions": versions(extra=("triton", "unsloth", "unsloth_zoo"))},
              "rows": [], "loss_chunks": [], "failures": [], "seconds": {}}
    record["provenance"]["commands"] = [record["provenance"].pop("command")]
    record["provenance"].update(NOTES)
    out = Path(args.json)
    if args.append:
        earlier = json.loads(out.read_text())
        if earlier["provenance"]["device"] != record["provenance"]["device"]:
            raise SystemExit(f"--append: {out} was measured on {earlier['provenance']['device']}, this run is on "
                             f"{record['provenance']['device']}; timings compare only on one device")
        earlier["provenance"]["commands"] += record["provenance"]["commands"]
        record = earlier
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "UNSLOTH_DISABLE_STATISTICS": "1"}
    with tempfile.TemporaryDirectory(prefix="unsloth-bench-") as tmp:
        for name in args.models.split(","):
            t0 = time.perf_counter()
            folder = save_model(name, Path(tmp) / name)
            at = f" ({args.shapes})" if args.shapes else ""
            record["seconds"][f"{name} save{at}"] = round(time.perf_counter() - t0, 1)
            for impl in args.implementations.split(","):
                t0 = time.perf_counter()
                cmd = [sys.executable, "-m", "qlora_tutorial.bench.unsloth", "--child", impl, "--folder", str(folder),
                       "--model", name, "--rounds", str(args.rounds), "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--ckpts", args.ckpts, "--json", "-"]
                cmd += [f"--{key}={value}" for key, value in (("shapes", args.shapes), ("setups", args.setups)) if value]
                cmd += ["--trace-peaks"] if args.trace_peaks else []
                try:
                    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
                    stdout, rc, log = done.stdout, done.returncode, done.stderr
                except subprocess.TimeoutExpired as exc:
                    stdout, rc, log = exc.stdout or "", "timeout", exc.stderr or ""
                    stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
                    log = log.decode() if isinstance(log, bytes) else log
                sys.stderr.write(log)  # every setup's every round, as it went
                tail = log[-3000:]
                for line in stdout.splitlines():
                    if line.startswith("ROW "):
                        row = json.loads(line[4:])
                        kind = next((k for k in ("loss_chunk", "peak_trace") if k in row), None)
                        row = row[kind] if kind else row
                        row["command"] = len(record["provenance"]["commands"]) - 1  # which command measured it
                        if kind:
                            record.setdefault(kind + "s", []).append(row)
                        else:
                            (record["failures"] if "failure" in row else record["rows"]).append(row)
                if rc != 0:
                    record["failures"].append({"failure": f"{name} {impl}", "rc": rc, "error": tail[-1500:]})
                record["seconds"][f"{name} {impl}{at}"] = round(time.perf_counter() - t0, 1)
                out.write_text(json.dumps(record, indent=1) + "\n")
            _free(DEVICE, workspaces=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

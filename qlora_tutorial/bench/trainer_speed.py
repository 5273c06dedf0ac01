"""The Trainer's step, ordinary and recorded: ``python -m qlora_tutorial.bench.trainer_speed``.

The same QLoRA model (TinyLlama-1.1B's architecture, random weights, every projection wrapped), data
and seed, trained for ``--steps`` steps by ``train.make_trainer`` (its decoder blocks compiled, as the
fine-tuning chapter does on a GPU: ``trainer`` = ``eager``) and by ``fast.make_fast_trainer`` (the step
recorded as CUDA graphs: ``fast``), in alternating rounds. For each run it records:

* ``wall_ms``: wall-clock per step over a window of steps in the middle of the run, the GPU
  synchronised at both ends of the window only (the Trainer's own logging syncs stay in it);
* ``gpu_ms``: the profiler's device time per step over a later window (kernels and copies; idle
  gaps, where the GPU waits for the host, excluded);
* ``peak_gib``: ``torch.cuda.max_memory_allocated`` over the run (weights included);
* the logged losses, so that ``loss_max_rel_diff`` compares the two trainers' first rounds.

Writes ``book/data/trainer_speed.json`` (``--json`` elsewhere). Needs a CUDA GPU.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from .profiling import device_ms_per_step
from .results import GIB, provenance, shown_command, write_json

JSON_PATH = Path("book") / "data" / "trainer_speed.json"
WALL_OVER_GPU_LIMIT = 1.15  # the recorded Trainer step: at most this much wall-clock per GPU-busy millisecond
LOSS_REL_TOL = 0.02  # the two trainers' logged losses, same data and seed


def _window_callback(timing: dict, wall: tuple[int, int], profiled: tuple[int, int]):
    from transformers import TrainerCallback

    class Window(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step = state.global_step
            if step in (wall[0], wall[1], profiled[0], profiled[1]):
                torch.cuda.synchronize()
            if step == wall[0]:
                timing["t0"] = time.perf_counter()
            if step == wall[1]:
                timing["wall_ms"] = (time.perf_counter() - timing["t0"]) * 1000 / (wall[1] - wall[0])
            if step == profiled[0]:
                from torch.profiler import ProfilerActivity, profile

                timing["profiler"] = profile(activities=[ProfilerActivity.CUDA])
                timing["profiler"].__enter__()
            if step == profiled[1]:
                prof = timing.pop("profiler")
                prof.__exit__(None, None, None)
                timing["gpu_ms"] = device_ms_per_step(prof, profiled[1] - profiled[0])

    return Window()


def run_once(trainer: str, folder: Path, rows, device, dtype, batch: int, steps: int, r: int, alpha: float,
             wall: tuple[int, int], profiled: tuple[int, int]) -> dict:
    """One training run; returns its row (without provenance) and its logged losses."""
    from .. import fast
    from ..device import Runtime, seed_everything
    from ..train import make_trainer, training_arguments
    from .suite import build

    seed_everything(0)
    model = build("qlora", "ours", folder, device, dtype, r=r, alpha=alpha)
    model.train()
    torch.cuda.reset_peak_memory_stats(device)
    timing: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        args = training_arguments(tmp, Runtime(device, dtype), per_device_train_batch_size=batch,
                                  gradient_accumulation_steps=1, learning_rate=1e-4, max_steps=steps, logging_steps=5,
                                  optim="adamw_torch", lr_scheduler_type="linear", warmup_steps=5, max_grad_norm=1.0)
        if trainer == "fast":
            t = fast.make_fast_trainer(model, args, rows, pad_token_id=0)
        else:
            fast.compile_for_training(model)
            t = make_trainer(model, args, rows, pad_token_id=0)
        t.add_callback(_window_callback(timing, wall, profiled))
        t.train()
    losses = [e["loss"] for e in t.state.log_history if "loss" in e]
    row = {"trainer": trainer, "mode": "qlora", "wall_ms": round(timing["wall_ms"], 2),
           "gpu_ms": round(timing["gpu_ms"], 2), "peak_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 3)}
    if trainer == "fast":
        row["why_ordinary"] = t.why_ordinary  # None: every step was recorded
    del t, model
    torch.cuda.empty_cache()
    return {"row": row, "losses": losses}


def trainer_targets(result: dict) -> list[dict]:
    """The recorded Trainer's targets, checked on a recorded result."""
    out = []
    for row in result["rows"]:
        if row["trainer"] == "fast":
            ratio = row["wall_ms"] / row["gpu_ms"]
            out.append({"target": "fast Trainer: wall-clock / GPU-busy", "value": round(ratio, 3),
                        "limit": WALL_OVER_GPU_LIMIT, "ok": ratio <= WALL_OVER_GPU_LIMIT})
    out.append({"target": "largest relative difference of the logged losses", "value": result["loss_max_rel_diff"],
                "limit": LOSS_REL_TOL, "ok": result["loss_max_rel_diff"] <= LOSS_REL_TOL})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of the two trainers")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32)
    parser.add_argument("--json", type=Path, default=JSON_PATH)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("the Trainer's speed is measured on a CUDA GPU; none is available here", file=sys.stderr)
        return 2
    if args.steps < 40 or args.rounds < 1:
        parser.error("--steps must be at least 40 (two windows after 10 warm-up steps) and --rounds at least 1")
    import datasets

    from ..models import tinyllama_config
    from .suite import save_random_model

    device, dtype = torch.device("cuda"), torch.bfloat16
    config = tinyllama_config()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.batch * args.steps, args.seq), generator=generator)
    rows = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    wall = (10, 10 + (args.steps - 10) * 3 // 5)
    profiled = (wall[1], args.steps - 1)
    command = " ".join(["python", "-m", "qlora_tutorial.bench.trainer_speed", *(argv if argv is not None else sys.argv[1:])])
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_random_model(config, Path(tmp), dtype, device)
        for k in range(args.rounds):
            for trainer in ("eager", "fast"):
                run = run_once(trainer, folder, rows, device, dtype, args.batch, args.steps, args.r, args.alpha,
                               wall, profiled)
                run["row"]["round"] = k
                print(run["row"], flush=True)
                runs.append(run)
    first = {run["row"]["trainer"]: run["losses"] for run in runs if run["row"]["round"] == 0}
    diff = max(abs(a - b) / abs(a) for a, b in zip(first["eager"], first["fast"]))
    result = {
        "provenance": {**provenance(device, shown_command(command)), "config": "tinyllama", "batch": args.batch,
                       "seq": args.seq, "steps": args.steps, "r": args.r, "alpha": args.alpha, "dtype": "bfloat16",
                       "targets": "every projection", "wall_window": list(wall), "profiled_window": list(profiled),
                       "note": " ".join(__doc__.split("\n\n")[1:3]).replace("\n", " ")},
        "rows": [run["row"] for run in runs],
        "losses": {f"{run['row']['trainer']}/{run['row']['round']}": run["losses"] for run in runs},
        "loss_max_rel_diff": round(diff, 5),
    }
    write_json(result, args.json)
    for target in trainer_targets(result):  # what tests/test_fast_trainer.py holds the recorded file to
        print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does a 4-bit base train as well as a 16-bit one? The date task, measured across bases and seeds.

    python -m qlora_tutorial.bench.quality --out book/data --workers 8      # on a CUDA GPU

Two grids, both on SmolLM2-135M-Instruct (the book's offline model) and the date task of chapter 08
(400 training dates, 200 held-out dates, chapter 08's recipe: 30 steps of batch 8 at lr 1e-3, with
paged AdamW), alpha = 16 for every rank as in the QLoRA paper:

* ``quality``: the base in bfloat16 (plain LoRA), NF4, NF4 with double quantization, FP4;
  LoRA on the MLP layers or on all linear layers; r in {8, 64}; seeds 0, 1, 2 (48 runs).
* ``variants``: the variants of chapter 14 on the same task, on all linear layers with r = 8: an
  8-bit base (LLM.int8), DoRA and LoRA+ (lr 5e-4 for W_a, 16x for W_b) beside plain QLoRA
  (NF4 + double quantization); seeds 0, 1, 2 (12 runs, one at a time, so their times compare).

The seed changes the LoRA initialisation and the order of the training batches; the dates are the
same for every run. Each run reports, per (config, seed): exact match on the held-out dates,
the held-out answer loss (``train.answer_loss``), the final training loss, the training time and the
peak GPU memory. ``quality`` runs several configurations at once in separate processes (the step of
a 135M model leaves the GPU mostly idle), so its times are not speed measurements; ``variants`` runs
one at a time.

Results: ``qlora_quality.csv`` and ``variants_date_task.csv`` (long format: one row per config, seed
and metric, with provenance columns), written as runs finish, so a cut-off run keeps what it did.
"""
from __future__ import annotations

import argparse
import csv
import shlex
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

BASES = {
    "bf16": dict(use_qlora=False),
    "nf4": dict(quant_type="nf4", double_quant=False),
    "nf4-dq": dict(quant_type="nf4", double_quant=True),
    "fp4": dict(quant_type="fp4", double_quant=False),
    "int8": dict(quant_type="int8"),
}
ALPHA = 16
N_TRAIN, N_TEST = 400, 200
SEEDS = (0, 1, 2)
LORAPLUS = dict(lr=5e-4, ratio=16.0)
FIELDS = ["config", "base", "targets", "r", "variant", "lr", "seed", "metric", "value", "device", "torch",
          "bitsandbytes", "transformers", "peft", "date", "command"]


def config_name(base: str, targets: str, r: int, variant: str) -> str:
    return f"{base}/{targets}/r{r}/{variant}"


def grid(name: str) -> list[dict]:
    """The runs of one grid, as dicts of base, targets, r, variant, seed."""
    if name == "quality":
        return [dict(base=b, targets=t, r=r, variant="lora", seed=s)
                for s in SEEDS for r in (8, 64) for t in ("mlp", "all") for b in ("bf16", "nf4", "nf4-dq", "fp4")]
    if name == "variants":
        return [dict(base=b, targets="all", r=8, variant=v, seed=s) for s in SEEDS
                for b, v in (("nf4-dq", "lora"), ("int8", "lora"), ("nf4-dq", "dora"), ("nf4-dq", "loraplus"))]
    raise ValueError(f"unknown grid {name!r}; the grids are 'quality' and 'variants'")


def run_one(run: dict, threads: int = 2) -> list[dict]:
    """Train one configuration on the date task and score it; returns its metric rows."""
    import torch

    from ..device import pick_device, seed_everything
    from ..models import load_model, load_tokenizer
    from ..quantize import quantize_model
    from ..tasks import date_datasets
    from ..train import (DATE_TASK_RECIPE, answer_loss, evaluate_task, make_trainer, tokenize_prompt_answer, train,
                         training_arguments)
    from ..variants import loraplus_optimizer

    torch.set_num_threads(threads)
    runtime = pick_device()
    seed_everything(run["seed"])
    tokenizer = load_tokenizer()
    train_set, test_set = date_datasets(n_train=N_TRAIN, n_test=N_TEST, seed=0)
    model = load_model(dtype=runtime.dtype, device=runtime.device)
    quantize_model(model, "mlp" if run["targets"] == "mlp" else "all", alpha=ALPHA, r=run["r"],
                   use_dora=run["variant"] == "dora", **BASES[run["base"]])
    recipe = dict(DATE_TASK_RECIPE)
    if run["variant"] == "loraplus":
        recipe["learning_rate"] = LORAPLUS["lr"]
    with tempfile.TemporaryDirectory() as tmp:
        args = training_arguments(tmp, runtime, seed=run["seed"], **recipe)
        optimizers = (loraplus_optimizer(model, args, LORAPLUS["ratio"]) if run["variant"] == "loraplus"
                      else (None, None))
        trainer = make_trainer(model, args, tokenize_prompt_answer(train_set, tokenizer), tokenizer.pad_token_id,
                               optimizers=optimizers)
        result = train(trainer)
    accuracy, _ = evaluate_task(model, tokenizer, test_set)
    metrics = {"exact_match": accuracy, "heldout_answer_loss": answer_loss(model, tokenizer, test_set),
               "final_train_loss": result["losses"][-1][1], "train_seconds": result["seconds"],
               "peak_gpu_gib": (result["peak_gpu_bytes"] or 0) / 2**30}
    name = config_name(run["base"], run["targets"], run["r"], run["variant"])
    return [dict(config=name, base=run["base"], targets=run["targets"], r=run["r"], variant=run["variant"],
                 lr=recipe["learning_rate"], seed=run["seed"], metric=k, value=f"{v:.6g}") for k, v in metrics.items()]


# ---------------------------------------------------------------- reading the results (the book does this)
def load(name: str) -> list[dict]:
    """The rows of ``book/data/qlora_quality.csv`` (``name="quality"``) or ``variants_date_task.csv``
    (``"variants"``), with ``r``, ``seed``, ``lr`` and ``value`` as numbers."""
    from .results import data_text

    text = data_text("qlora_quality.csv" if name == "quality" else "variants_date_task.csv")
    rows = list(csv.DictReader(text.splitlines()))
    if rows and list(rows[0]) != FIELDS:
        raise ValueError(f"not a quality-study CSV: its columns are {list(rows[0])}, expected {FIELDS}")
    for row in rows:
        row.update(r=int(row["r"]), seed=int(row["seed"]), lr=float(row["lr"]), value=float(row["value"]))
    return rows


def summary(rows: list[dict], metric: str) -> dict[str, tuple[float, float, int]]:
    """{config: (mean, sample standard deviation, number of seeds)} of one metric."""
    import statistics

    values: dict[str, list[float]] = {}
    for row in rows:
        if row["metric"] == metric:
            values.setdefault(row["config"], []).append(row["value"])
    return {c: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)) for c, v in values.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlora_tutorial.bench.quality", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="book/data", help="folder for the CSV files")
    parser.add_argument("--grids", nargs="+", default=["quality", "variants"], choices=["quality", "variants"])
    parser.add_argument("--workers", type=int, default=8, help="processes at once for the quality grid")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="a subset of the seeds (default 0 1 2)")
    args = parser.parse_args(argv)

    import torch

    from .results import provenance, shown_command

    if not torch.cuda.is_available():
        raise SystemExit("the quality study trains 60 models: it is meant for a CUDA GPU")
    # recorded without --out (a folder on the machine that ran it): what a reader types again
    command = shown_command("python -m qlora_tutorial.bench.quality " + " ".join(
        map(shlex.quote, argv if argv is not None else sys.argv[1:])))
    stamp = provenance(torch.device("cuda"), command.strip())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.grids:
        runs = [r for r in grid(name) if args.seeds is None or r["seed"] in args.seeds]
        path = out / ("qlora_quality.csv" if name == "quality" else "variants_date_task.csv")
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, FIELDS)
            writer.writeheader()
            workers = args.workers if name == "quality" else 1
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
                futures = {pool.submit(run_one, run): run for run in runs}
                for done, future in enumerate(as_completed(futures), 1):
                    rows = future.result()
                    for row in rows:
                        writer.writerow({**row, **stamp})
                    f.flush()
                    summary = {r["metric"]: r["value"] for r in rows}
                    print(f"[{name} {done}/{len(runs)}] {rows[0]['config']} seed {rows[0]['seed']}: "
                          f"exact match {summary['exact_match']}, held-out loss {summary['heldout_answer_loss']}, "
                          f"{summary['train_seconds']} s", flush=True)
        print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

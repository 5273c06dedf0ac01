"""What the GPU records in book/data must show: the recorded Trainer step.

The runs happen on a GPU (the commands are in each file's provenance); these checks hold the
recorded numbers to the targets that belong to the benchmark, not to the chapters that show them.
"""
import json
from pathlib import Path

from qlora_tutorial.bench import trainer_speed

BOOK = Path(__file__).resolve().parent.parent / "book"
PROVENANCE = {"device", "torch", "bitsandbytes", "transformers", "peft", "date", "command"}


def test_the_recorded_trainer_step_meets_its_targets():
    result = json.loads((BOOK / "data" / "trainer_speed.json").read_text())
    assert PROVENANCE <= set(result["provenance"]) and "/root/" not in result["provenance"]["command"]
    rows = result["rows"]
    assert {r["trainer"] for r in rows} == {"eager", "fast"}
    for row in rows:
        assert {"trainer", "mode", "wall_ms", "gpu_ms", "peak_gib"} <= set(row)
        assert row["wall_ms"] > 0 and row["gpu_ms"] > 0 and row["peak_gib"] > 0
    assert all(r["why_ordinary"] is None for r in rows if r["trainer"] == "fast")  # every step recorded
    targets = trainer_speed.trainer_targets(result)
    assert targets and all(t["ok"] for t in targets), targets
    # the recorded step is the faster one by wall-clock in every round
    for k in {r["round"] for r in rows}:
        by = {r["trainer"]: r for r in rows if r["round"] == k}
        assert by["fast"]["wall_ms"] < by["eager"]["wall_ms"]


"""bench.quality: the grids, and the recorded study in book/data that chapter 14 reads."""
import pytest

from qlora_tutorial.bench import quality

METRICS = {"exact_match", "heldout_answer_loss", "final_train_loss", "train_seconds", "peak_gpu_gib"}


def test_grids_cover_every_combination_once():
    runs = quality.grid("quality")
    assert len(runs) == 48 == len({tuple(r.values()) for r in runs})
    assert {r["base"] for r in runs} == {"bf16", "nf4", "nf4-dq", "fp4"}
    assert {(r["targets"], r["r"]) for r in runs} == {("mlp", 8), ("mlp", 64), ("all", 8), ("all", 64)}
    variants = quality.grid("variants")
    assert len(variants) == 12
    assert {(r["base"], r["variant"]) for r in variants} == {
        ("nf4-dq", "lora"), ("int8", "lora"), ("nf4-dq", "dora"), ("nf4-dq", "loraplus")}
    with pytest.raises(ValueError, match="unknown grid"):
        quality.grid("other")


@pytest.mark.parametrize("name", ["quality", "variants"])
def test_recorded_study_is_complete_with_provenance(name):
    rows = quality.load(name)
    expected = {quality.config_name(r["base"], r["targets"], r["r"], r["variant"]) for r in quality.grid(name)}
    for metric in METRICS:
        stats = quality.summary(rows, metric)
        assert set(stats) == expected and all(n == 3 for _, _, n in stats.values())
    for row in rows:
        assert row["device"].startswith("NVIDIA") and row["date"] and row["command"].startswith(
            "python -m qlora_tutorial.bench.quality")
        if row["metric"] == "exact_match":
            assert 0 <= row["value"] <= 1


def test_summary_is_mean_and_sample_deviation():
    rows = [{"config": "c", "metric": "m", "value": v} for v in (1.0, 2.0, 4.0)]
    mean, sd, n = quality.summary(rows, "m")["c"]
    assert (mean, n) == (7 / 3, 3) and abs(sd - 1.5275252316519468) < 1e-12


def test_shown_command_leaves_out_the_output_folder():
    from qlora_tutorial import bench

    assert bench.shown_command("python -m qlora_tutorial.bench.quality --out /x/y --grids variants") == \
        "python -m qlora_tutorial.bench.quality --grids variants"
    assert bench.shown_command("python -m qlora_tutorial.bench --speed --csv /root/out/a.csv --rounds 8 "
                               "--json /root/out/b.json") == "python -m qlora_tutorial.bench --speed --rounds 8"

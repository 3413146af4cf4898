"""The benchmark statistics on literal numbers, and the benchmarks' CI-sized runs."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from tests.helpers import child_env  # noqa: E402

from stats import bootstrap_ci, fmt_ci, frontier_at, frontier_auc, paired_ci  # noqa: E402

POINTS = [{"kl": 0.0, "gold": 0.1}, {"kl": 0.7, "gold": 0.4}, {"kl": 1.5, "gold": 0.3}, {"kl": 3.0, "gold": 0.6}]


def test_frontier_at_is_the_best_reward_within_the_budget():
    assert frontier_at(POINTS, 1.0) == 0.4 and frontier_at(POINTS, 2.0) == 0.4
    assert frontier_at(POINTS, 4.0) == 0.6 and frontier_at(POINTS, -1.0) is None


def test_frontier_auc_integrates_the_step_frontier():
    assert frontier_auc(POINTS, kl_max=4.0) == pytest.approx(0.3975)
    # kl_max below the last point: (0.1 * 0.7 + 0.4 * 1.3) / 2 = 0.295
    assert frontier_auc(POINTS, kl_max=2.0) == pytest.approx(0.295)
    # a slightly negative Monte-Carlo KL counts from 0; no point at KL <= 0: undefined
    assert frontier_auc([{"kl": -0.01, "gold": 0.2}], kl_max=1.0) == pytest.approx(0.2)
    assert frontier_auc([{"kl": 0.5, "gold": 0.2}]) is None


def test_bootstrap_and_paired_intervals():
    mean, low, high = bootstrap_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and 1.0 <= low < 2.0 < high <= 3.0
    assert bootstrap_ci([1.0, 2.0, 3.0]) == (mean, low, high)            # deterministic
    assert bootstrap_ci([0.5]) == (0.5, 0.5, 0.5)
    d = paired_ci({0: 0.7, 1: 0.6}, {0: 0.5, 1: 0.5, 2: 0.9})
    assert d[0] == pytest.approx(0.15) and 0.1 - 1e-9 <= d[1] <= d[2] <= 0.2 + 1e-9
    assert paired_ci({0: 1.0}, {1: 1.0}) is None
    assert fmt_ci((0.6, 0.55, 0.65)) == "0.600 [0.550, 0.650]" and fmt_ci(None) == "n/a"


@pytest.fixture(scope="module")
def exports(sft_dir, preference_dir, tmp_path_factory):
    """A directory with the tiny SFT export as sft/, an (uncalibrated: mean 0, std 1) reward export as reward/ and
    an (uncalibrated) preference-model export as preference/."""
    import shutil

    from modules.backbone import BackboneSpec
    from modules.reward_model import RewardModule

    root = tmp_path_factory.mktemp("exports")
    shutil.copytree(sft_dir, root / "sft")
    module = RewardModule(BackboneSpec(pretrained=sft_dir), sft_dir)
    module.configure_model()
    module.export(str(root / "reward"))
    shutil.copytree(preference_dir, root / "preference")
    return root


def _run(script: str, exports: Path, out: Path, *extra: str) -> str:
    import subprocess

    proc = subprocess.run([sys.executable, f"benchmarks/{script}", "--quick", "--exports", str(exports),
                           "--out", str(out), *extra], capture_output=True, text=True, timeout=900,
                          env=child_env())
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_invariance_quick_runs_and_reports_every_scale(exports, tmp_path):
    _run("invariance.py", exports, tmp_path)
    table = (tmp_path / "table.md").read_text().splitlines()
    rows = {(line.split("|")[1].strip(), line.split("|")[2].strip()): line for line in table[2:]}
    assert set(rows) == {("P3O-V2", "0"), ("P3O-V2", "16"), ("PPO", "0"), ("PPO", "16")}
    assert (tmp_path / "invariance.png").exists()


@pytest.mark.slow
def test_frontier_quick_reports_intervals_paired_differences_and_overoptimisation(exports, tmp_path):
    _run("frontier.py", exports, tmp_path)
    table = (tmp_path / "table.md").read_text()
    assert "| P3O-V2 |" in table and "| GRPO-4 |" in table and "AUC (KL<=8)" in table
    assert "Paired differences P3O-V2 minus" in table and "Over-optimisation against the weak reward model" in table
    assert (tmp_path / "frontier.png").exists() and (tmp_path / "overoptimisation.png").exists()
    import csv

    points = list(csv.DictReader(open(tmp_path / "points.csv")))
    assert {int(p["rollout"]) for p in points} == {0, 1, 2, 3, 4}            # evaluated after every rollout
    from frontier import report
    from runs import read_points

    (tmp_path / "table.md").unlink()
    report(read_points(tmp_path / "points.csv"), tmp_path)                  # --report-only: the same table again
    assert (tmp_path / "table.md").read_text() == table


@pytest.mark.slow
def test_relative_quick_reports_the_pairwise_arms_offline_dpo_and_the_cost(exports, tmp_path):
    _run("relative.py", exports, tmp_path, "--seeds", "0", "--arms", "P3O pairwise", "GRPO-4 tournament", "offline DPO")
    table = (tmp_path / "table.md").read_text()
    for arm in ("P3O pairwise", "GRPO-4 tournament", "offline DPO"):
        assert f"| {arm} |" in table
    assert "Paired differences P3O pairwise minus" in table and (tmp_path / "frontier.png").exists()
    # cost: 16 responses per rollout; K = 2 -> 8 pairs (16 forwards), K = 4 -> 4 prompts x 6 pairs (48 forwards)
    assert "| P3O pairwise | 8 | 16 |" in table and "| GRPO-4 tournament | 24 | 48 |" in table
    import csv

    dpo = [p for p in csv.DictReader(open(tmp_path / "points.csv")) if p["objective"] == "offline DPO"]
    assert [int(p["rollout"]) for p in dpo] == [0, 2]          # 64 pairs in batches of 32: evaluated at 0 and the end


@pytest.mark.slow
def test_verifiable_quick_builds_its_sft_export_and_reports_every_objective(tmp_path):
    _run("verifiable.py", tmp_path / "exports", tmp_path / "out")
    assert (tmp_path / "exports" / "sft" / "config.json").exists() and (tmp_path / "out" / "accuracy.png").exists()
    table = (tmp_path / "out" / "table.md").read_text()
    for arm in ("P3O", "RLOO", "GRPO-4", "P3O-4", "P3O scale_q", "P3O-V1", "P3O clip 0.4", "GRPO-4 unscaled",
                "P3O lr 1e-4", "P3O kl 0", "GRPO-4 sequence ratio", "GRPO-4 KL in reward",
                "GRPO-4 KL in reward unscaled", "P3O KL in loss", "P3O KL in loss, beta 0.025", "GRPO-4 dynamic sampling",
                "P3O-4 dynamic sampling", "P3O dynamic sampling", "GRPO-4 unbiased KL", "GRPO-4 CISPO", "GRPO-4 SAPO",
                "GRPO-4 + judge", "GDPO-4 + judge", "P3O + judge", "P3O normalize_terms + judge"):
        assert f"| {arm} |" in table
    assert "| objective | accuracy at start | at rollout 1 | at the end |" in table
    import csv

    points = list(csv.DictReader(open(tmp_path / "out" / "points.csv")))
    assert [int(p["rollout"]) for p in points if p["objective"] == "P3O"] == [0, 1, 2, 3]   # evaluated every rollout
    assert all(0.0 <= float(p["gold"]) <= 1.0 for p in points)                            # accuracies
    sampled = {p["objective"]: int(p["samples"]) for p in points if p["rollout"] == "1"}
    assert (sampled["P3O"], sampled["P3O dynamic sampling"], sampled["GRPO-4 dynamic sampling"]) == (16, 48, 32)
    # each evaluation after the first carries the mean train/clipfrac of the rollouts since the one before (SAPO: no
    # clip, no clipfrac)
    assert all((p["clipfrac"] == "") == (p["rollout"] == "0" or p["objective"] == "GRPO-4 SAPO") for p in points)
    assert all(0.0 <= float(p["clipfrac"]) <= 1.0 and 0.0 <= float(p["tied_groups"]) <= 1.0
               for p in points if p["clipfrac"])
    # the composed arms log the judge's term (`train/reward_judge`), the others have none
    assert all((p["reward_judge"] != "") == (p["objective"].endswith("+ judge") and p["rollout"] != "0") for p in points)


def test_quick_runs_write_nothing_where_the_published_results_and_full_exports_are(tmp_path, capsys):
    """`--quick` with --out / --exports at their defaults (benchmarks/results/..., artifacts/...) moves them to a
    scratch directory, saying so; one given explicitly, or a full run, stays where it is. Every learning benchmark
    (frontier, invariance, relative, smollm2, verifiable, tools) calls it with its own defaults."""
    import argparse
    import tempfile

    from benchmarks.runs import ROOT, learning_arguments, quick_scratch, settle

    out, exports = ROOT / "benchmarks/results/verifiable", ROOT / "artifacts/sums"
    parser = argparse.ArgumentParser()
    learning_arguments(parser, quick_help="", seeds=[0, 1], rollouts=80, exports=exports, out=out)
    args = parser.parse_args(["--quick"])
    settle(parser, args, [0, 1])
    scratch = Path(tempfile.gettempdir()) / "p3o-rlhf-quick"
    assert (args.out, args.exports) == (scratch / "benchmarks/results/verifiable", scratch / "artifacts/sums")
    assert "[quick] --out " in capsys.readouterr().out
    for argv, expected in ((["--quick", "--out", str(tmp_path)], (tmp_path, scratch / "artifacts/sums")),
                           ([], (out, exports))):
        args = parser.parse_args(argv)
        settle(parser, args, [0, 1])
        assert (args.out, args.exports) == expected
    for script in ("frontier", "invariance", "relative", "smollm2"):
        assert 'quick_scratch(parser, args, "out")' in (ROOT / f"benchmarks/{script}.py").read_text()
    args = parser.parse_args(["--quick", "--out", str(tmp_path)])
    quick_scratch(parser, args, "out")
    assert args.out == tmp_path


def test_verifiable_summary_on_literal_points():
    """Two seeds evaluated at 0, 5, 10: start 0.4 / 0.5, at 5 (the first evaluation at or after a quarter of the
    run) 0.9 / 0.6, end 0.8 / 0.7 with KL 1.0 / 2.0, best 0.9 / 0.7; clipfrac the mean of the two windows':
    (0.2 + 0.1) / 2 = 0.15 and (0.3 + 0.3) / 2 = 0.3."""
    from benchmarks.verifiable import early_rollout, summary

    rows = [{"objective": "P3O", "seed": s, "rollout": r, "gold": g, "kl": k, "clipfrac": c, "run_s": 10.0}
            for s, points in ((0, [(0, 0.4, 0.0, None), (5, 0.9, 0.5, 0.2), (10, 0.8, 1.0, 0.1)]),
                              (1, [(0, 0.5, 0.0, None), (5, 0.6, 1.0, 0.3), (10, 0.7, 2.0, 0.3)]))
            for r, g, k, c in points]
    assert early_rollout(rows) == 5
    arm = summary(rows)["P3O"]
    assert arm["start"] == {0: 0.4, 1: 0.5} and arm["end"] == {0: 0.8, 1: 0.7} and arm["best"] == {0: 0.9, 1: 0.7}
    assert arm["early"] == {0: 0.9, 1: 0.6} and arm["kl"] == {0: 1.0, 1: 2.0}
    assert arm["clipfrac"] == pytest.approx({0: 0.15, 1: 0.3})


def test_verifiable_runs_of_some_arms_keep_the_other_arms_rows(tmp_path):
    from benchmarks.runs import write_points
    from benchmarks.verifiable import TRAIN_METRICS, kept_rows

    assert kept_rows(tmp_path / "points.csv", ["P3O"]) == []
    rows = [{"objective": arm, "seed": 0, "rollout": 0, "gold": 0.5} for arm in ("P3O", "RLOO", "gone")]
    write_points(rows, tmp_path)
    assert kept_rows(tmp_path / "points.csv", ["P3O"]) == [{**rows[1], **dict.fromkeys(TRAIN_METRICS)}]
    # (an arm no longer defined: dropped; a metric added since the run: empty)


def test_verifiable_clipfrac_window_is_the_mean_of_the_rollouts_since_the_last_evaluation():
    """Rollout r's value is values[r - 1]: (0, 2] -> (0.1 + 0.2) / 2, (2, 4] -> (0.3 + 0.5) / 2 (a rollout without
    the metric skipped: (2, 5] -> the same 0.4); before the first rollout there is none."""
    from benchmarks.verifiable import mean_since

    values = [0.1, 0.2, 0.3, 0.5, None]
    assert mean_since(values, None, 0) is None
    assert mean_since(values, 0, 2) == pytest.approx(0.15)
    assert mean_since(values, 2, 4) == pytest.approx(0.4) == mean_since(values, 2, 5)


@pytest.mark.slow
def test_throughput_side_runs_ours_with_8bit_adamw(tmp_path):
    """`benchmarks/memory.py`'s `defaults+adamw8bit` variant: throughput.py's side of ours with `--optimizer
    adamw-8bit` trains with bitsandbytes' AdamW8bit (the class its config names) and reports its peak and seconds."""
    import json
    import subprocess

    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "benchmarks/throughput.py", "--side", "ours", "--quick", "--rollouts", "1",
                           "--library-defaults", "--optimizer", "adamw-8bit", "--json", str(out)],
                          capture_output=True, text=True, timeout=900, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["optimizer"] == "AdamW8bit" and result["peak_gb"] > 0.1 and len(result["seconds"]) >= 1


@pytest.mark.slow
def test_throughput_quick_prints_the_table_for_our_side():
    """TRL is an optional extra (not installed in CI): --sides ours measures our RL stage alone (LoRA: `--lora 4`,
    whose FLOPs `test_throughput_shapes_parameter_counts_and_lora_flops` checks)."""
    import subprocess

    proc = subprocess.run([sys.executable, "benchmarks/throughput.py", "--quick", "--sides", "ours"],
                          capture_output=True, text=True, timeout=900, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| ours |" in proc.stdout and "compute floor:" in proc.stdout and "perf/rollout_s" in proc.stdout
    assert "decode-shaped matmul rate" in proc.stdout and "new tokens/s; update phase" in proc.stdout
    assert "full fine-tune" in proc.stdout


@pytest.mark.slow
def test_checkpoint_quick_shows_the_frozen_weights_left_out():
    """Both settings' rows: the file holds the trained weights and optimizer state (within 1%: the loops' state,
    pickling); a LoRA checkpoint is under 5% of what it was with its base and the reward model inside."""
    import subprocess

    proc = subprocess.run([sys.executable, "benchmarks/checkpoint.py", "--quick"], capture_output=True, text=True,
                          timeout=900, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in proc.stdout.splitlines()
            if line.startswith(("| full fine-tune", "| LoRA r 16"))}
    assert set(rows) == {"full fine-tune", "LoRA r 16"}, proc.stdout
    for name, cells in rows.items():
        file, weights, optimizer, left_out = (float(c.split()[0]) for c in cells[:4])
        assert file == pytest.approx(weights + optimizer, rel=0.01, abs=2e-3) and left_out > 0, (name, cells)
    assert float(rows["LoRA r 16"][5]) < 0.05 and 0.5 < float(rows["full fine-tune"][5]) < 0.7


def test_throughput_shapes_parameter_counts_and_lora_flops():
    """The 1B shape has >= 1e9 parameters as transformers builds it (on the meta device), equal to
    `rollout_params`; LoRA updates count forward + input gradient: 2/3 of a full update's FLOPs."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from benchmarks.throughput import SHAPES, rollout_flops, rollout_params

    for shape in SHAPES.values():
        cfg = dict(shape)
        config = AutoConfig.for_model(cfg.pop("model_type"), vocab_size=49152, **cfg)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        assert sum(p.numel() for p in model.parameters()) == rollout_params(shape)
    assert rollout_params(SHAPES["llama-1b"]) >= 1e9
    full = rollout_flops(SHAPES["llama-1b"], 42, 32, 49152)
    lora = rollout_flops(SHAPES["llama-1b"], 42, 32, 49152, lora=True)
    assert lora["update"] == pytest.approx(full["update"] * 2 / 3) and lora["generate"] == full["generate"]


def test_the_trl_reuse_side_stops_where_our_malloc_settings_cannot_be_applied(monkeypatch):
    """`trl-reuse` is TRL under the glibc settings our train.py applies (`reuse_freed_memory`); where they cannot be
    applied it stops in one line, before building anything, rather than measure TRL as shipped under that name."""
    from types import SimpleNamespace

    from benchmarks.throughput import run_trl

    monkeypatch.setenv("P3O_REUSE_FREED_MEMORY", "0")
    with pytest.raises(SystemExit, match="trl-reuse: glibc's malloc settings could not be applied"):
        run_trl({}, 1, SimpleNamespace(side="trl-reuse"))


@pytest.mark.slow
def test_decode_quick_prints_every_way_with_its_ratio():
    import subprocess

    proc = subprocess.run([sys.executable, "benchmarks/decode.py", "--quick"], capture_output=True, text=True,
                          timeout=600, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1].strip() for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["way", "hf", "draw", "prepacked"] and "| hf | " in proc.stdout and "| 1.00 |" in proc.stdout
    assert "torch.multinomial" in proc.stdout and "F.inverse_cdf_sample" in proc.stdout


@pytest.mark.slow
def test_layout_quick_reports_every_layout_against_the_padded_one(exports, tmp_path):
    import subprocess

    proc = subprocess.run([sys.executable, "benchmarks/layout.py", "--quick", "--exports", str(exports)],
                          capture_output=True, text=True, timeout=900, env=child_env())
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    rows = [line.split("|")[1].strip() for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["layout", "packed", "padded", "unshared"]
    assert "padding in the padded layout" in proc.stdout and "perf/update_s" in proc.stdout
    assert [line for line in proc.stdout.splitlines() if line.startswith("| padded |")][0].endswith("| 1.00 |")


@pytest.mark.slow
def test_smollm2_comparison_quick_reports_every_objective_from_one_start(exports, tmp_path):
    _run("smollm2.py", exports, tmp_path)
    rows = [line.split("|")[1].strip() for line in (tmp_path / "table.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| objective")]
    assert rows == ["SFT", "P3O-V2", "PPO", "GRPO-2"] + ["P3O-V2", "PPO", "GRPO-2"]   # runs, then frontiers
    import csv
    with open(tmp_path / "points.csv", newline="") as handle:
        points = list(csv.DictReader(handle))
    starts = {p["objective"]: p["gold"] for p in points if p["rollout"] == "0"}
    assert len(starts) == 3 and len(set(starts.values())) == 1    # same SFT policy, prompts and evaluation seed
    assert {p["rollout"] for p in points} == {"0", "1", "2"} and (tmp_path / "curves.png").exists()
    from runs import read_points
    from smollm2 import report

    table = (tmp_path / "table.md").read_text()
    (tmp_path / "table.md").unlink()
    report(read_points(tmp_path / "points.csv"), tmp_path, n_prompts=8)      # --report-only: the same table again
    assert (tmp_path / "table.md").read_text() == table


def test_memory_benchmark_settings_compute_the_same_update():
    """`benchmarks/memory.py`'s child step, in this process at the quick size: every setting (whole logits, chunked
    head, micro-batches, + activation checkpointing) gives the same loss and gradient norm; `micro` splits."""
    import argparse

    from memory import SETTINGS, one_update

    runs = {}
    for name in SETTINGS:
        args = argparse.Namespace(setting=name, quick=True, vocab=512, threads=2, micro_batch_tokens=48, prompts=4,
                                  prompt_tokens=8, response_tokens=16)
        runs[name] = one_update(args)
    assert runs["micro"]["micro_batches"] >= 3 and runs["whole"]["micro_batches"] == 1
    for name, run in runs.items():
        assert run["loss"] == pytest.approx(runs["whole"]["loss"], rel=1e-5), name
        assert run["grad_norm"] == pytest.approx(runs["whole"]["grad_norm"], rel=1e-4), name


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("entropy", [False, True])
def test_memory_head_ways_compute_the_same_gradients(entropy, precision):
    """`benchmarks/memory.py --head`'s child step, in this process: 40 rows in chunks of 16, vocabulary 3000, hidden
    64: the whole logits, the autograd-per-chunk reference and the library give the same gradients (the reference is
    what the library's written-out backward is measured against; under bf16 autocast within bf16 rounding: the
    library's backward then goes by slices of the vocabulary), and each reports its peak and seconds."""
    import argparse

    import torch
    from memory import HEAD_WAYS, one_head

    runs = {way: one_head(argparse.Namespace(way=way, rows=40, vocab=3000, chunk=16, threads=1, entropy=entropy,
                                             hidden=64, precision=precision)) for way in HEAD_WAYS}
    tol = 1e-5 if precision == "32-true" else 1e-2          # (bf16: relative to the largest gradient)
    for way, run in runs.items():
        assert run["chunk"] == 16 and run["peak_mb"] >= 0 and run["backward_s"] > 0
        for got, want in zip(map(torch.tensor, run["grads"]), map(torch.tensor, runs["whole"]["grads"])):
            assert torch.allclose(got, want, atol=tol * (1 if precision == "32-true" else want.abs().max())), way


@pytest.mark.slow
def test_memory_sweep_quick_prints_a_row_per_point_for_our_side():
    """TRL is an optional extra (not in CI's install; in `make lock`'s, with the bench extra): the sweep measures
    TRL's side where it imports and ours always, a row per point, with peak memory and seconds per rollout for each
    of our variants (one point, one variant: a process each). Here the variant runs on 2 CPU processes under FSDP2:
    its progress line gives each rank's peak, the table the larger."""
    import re
    import subprocess

    proc = subprocess.run([sys.executable, "benchmarks/memory.py", "--quick", "--points", "N16", "--ours", "defaults",
                           "--strategies", "fsdp2"],
                          capture_output=True, text=True, timeout=900, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    head = [line for line in proc.stdout.splitlines() if line.startswith("| point |")]
    assert len(head) == 1 and "| ours defaults fsdp2 GB | ours defaults fsdp2 s |" in head[0], proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| N16 |")]
    assert len(rows) == 1 and "| 8 | 16 | 49,152 |" in rows[0]
    column = [cell.strip() for cell in head[0].strip(" |").split("|")].index("ours defaults fsdp2 GB")
    peak, seconds = (float(cell) for cell in rows[0].strip(" |").split("|")[column:column + 2])
    assert peak > 0.1 and seconds > 0
    ranks = re.search(r"\(ranks ([0-9.]+), ([0-9.]+); sum ([0-9.]+)\)", proc.stdout)
    assert ranks, proc.stdout
    assert peak == pytest.approx(max(float(ranks[1]), float(ranks[2])), abs=0.01)


@pytest.mark.slow
def test_memory_build_quick_prints_the_peak_of_building_the_models():
    """`benchmarks/memory.py --build`: our RL module's models are built (no rollout) and the table gives each
    strategy's peak per process, above the fresh interpreter's footprint, and all processes' sum: one process, and
    FSDP2 on `--processes 3` with `--lora` and an LLM judge as the reward (`--judge`)."""
    import subprocess

    proc = subprocess.run([sys.executable, "benchmarks/memory.py", "--build", "--quick", "--strategies", "single",
                           "fsdp2", "--processes", "3", "--lora", "4", "--judge"],
                          capture_output=True, text=True, timeout=900, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LoRA r=4, no reference copy, an LLM judge of the same shape as the reward" in proc.stdout
    rows = {line.split("|")[1].strip(): [float(x) for x in line.strip(" |").split("|")[1:]]
            for line in proc.stdout.splitlines() if line.startswith(("| single |", "| fsdp2 |"))}
    assert rows.keys() == {"single", "fsdp2"}, proc.stdout
    processes, peak, every = rows["single"]
    assert processes == 1 and peak == every > 0.2
    processes, peak, every = rows["fsdp2"]
    assert processes == 3 and 3 * peak >= every - 0.02 and every > 2 * 0.2   # (each printed to 0.01 GB)


@pytest.mark.slow
def test_allocator_quick_prints_rss_live_tensors_and_seconds_per_setting():
    """`benchmarks/allocator.py --quick`, two settings at one size (a process each): a row per setting with the
    peak RSS and the peak of the tensors alive (read from torch.profiler's memory timeline), both positive."""
    import subprocess

    proc = subprocess.run([sys.executable, "benchmarks/allocator.py", "--quick", "--groups", "2", "--settings", "reuse",
                           "mmap1m"], capture_output=True, text=True, timeout=600,
                          env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.strip(" |").split("|") for line in proc.stdout.splitlines() if line.startswith(("| reuse", "| mmap1m"))]
    assert [r[0].strip() for r in rows] == ["reuse", "mmap1m"]
    for row in rows:
        assert row[1].strip() == "32" and float(row[2]) > 0 and float(row[3]) > 0 and float(row[4]) > 0


def test_allocator_skips_an_allocator_the_linker_cannot_preload():
    """A preloaded allocator that is not installed is reported, not measured with glibc under its name: ld.so only
    warns and runs the program without it."""
    from benchmarks.allocator import preloadable

    assert preloadable("libc.so.6") and not preloadable("libp3o-no-such-allocator.so.1")


def test_the_harness_alternates_sides_and_reports_a_failed_child(tmp_path):
    from benchmarks.harness import alternate, child

    order = []
    runs = alternate(["a", "b"], 3, lambda side: order.append(side) or len(order))
    assert order == ["a", "b"] * 3 and runs == {"a": [1, 3, 5], "b": [2, 4, 6]}
    script = tmp_path / "side.py"
    script.write_text("import json, sys\nif sys.argv[1] == 'fail': sys.exit('broken side')\n"
                      "json.dump({'side': sys.argv[1]}, open(sys.argv[-1], 'w'))\n")
    assert child([script, "ok"], "demo") == {"side": "ok"}
    assert child([script, "fail"], "demo", fail_ok=True) == {"error": "exit 1: broken side"}
    with pytest.raises(SystemExit, match=r"\[demo\] failed \(exit 1\)"):
        child([script, "fail"], "demo")


def test_the_memory_figure_reads_progress_lines_and_tables(tmp_path):
    """A sweep stopped before its table leaves progress lines (seconds: the median after the warm-up rollout);
    a table row of a later run replaces them; the figure is drawn from both."""
    from memory import plot_sweep, read_sweep_tables

    stopped = "[memory] base trl: peak 9.71 GB, ['139.3', '136.8'] s per rollout\n" \
              "[memory] base ours defaults: peak 11.62 GB, ['97.5', '78.8', '80.8'] s per rollout, update phase 30.1 s\n"
    table = "| point | L | responses | vocabulary | trl GB | trl s | ours defaults GB | ours defaults s | " \
            "ours defaults / TRL memory | ours defaults / TRL time |\n|---|---|---|---|---|---|---|---|---|---|\n" \
            "| N64 | 128 | 64 | 49,152 | 11.85 | 253.6 | 19.87 | 147.8 | 1.68 | 0.58 |\n" \
            "| base | 128 | 32 | 49,152 | 9.70 | 137.0 | 11.00 | 70.0 | 1.13 | 0.51 |\n"
    assert read_sweep_tables([stopped]) == {("base", "trl"): {"peak_gb": 9.71, "seconds": 136.8},
                                           ("base", "ours defaults"): {"peak_gb": 11.62, "seconds": 79.8}}
    rows = read_sweep_tables([stopped, table])
    assert rows["base", "ours defaults"] == {"peak_gb": 11.0, "seconds": 70.0} and len(rows) == 4
    plot_sweep(rows, tmp_path / "memory.png")
    assert (tmp_path / "memory.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.parametrize("task,measure,second,calls", [("calculator", "accuracy", "calls per answer", 1.0),
                                                       ("register", "register holds the sum", "calls per answer", 2.0),
                                                       ("guess", "secret guessed", "hints followed", 0.0)])
def test_tools_quick_builds_its_sft_export_and_reports_every_arm(tmp_path, task, measure, second, calls):
    """The guessing game's arms include P3O-4, and its points keep the hints followed (a share) and the user's
    messages per response (at most max_user_turns, 4)."""
    _run("tools.py", tmp_path / "exports", tmp_path / "out", "--task", task)
    assert (tmp_path / "exports" / "sft" / "config.json").exists() and (tmp_path / "out" / "tools.png").exists()
    table = (tmp_path / "out" / "table.md").read_text()
    assert f"| objective | seeds | rollouts | {measure} at start | at the end | {second} at start |" in table
    for arm in ("P3O", "GRPO-4", "RLOO") + (("P3O-4",) if task == "guess" else ()):
        assert f"| {arm} | 1 | 3 |" in table
    import csv

    points = list(csv.DictReader(open(tmp_path / "out" / "points.csv")))
    assert [int(p["rollout"]) for p in points if p["objective"] == "P3O"] == [0, 1, 2, 3]
    assert all(0.0 <= float(p["gold"]) <= 1.0 and 0.0 <= float(p["tool_calls"]) <= calls for p in points)
    if task == "guess":
        assert all(0.0 <= float(p["followed"]) <= 1.0 and 0.0 <= float(p["user_turns"]) <= 4 for p in points)


def test_tools_summary_on_literal_points():
    """The docstring's example."""
    from benchmarks.tools import summary

    rows = [{"objective": "P3O", "seed": s, "rollout": r, "gold": g, "tool_calls": c, "kl": k}
            for s, points in ((0, [(0, 0.4, 0.5, 0.0), (10, 0.9, 1.0, 1.2)]), (1, [(0, 0.5, 0.4, 0.0), (10, 0.8, 0.9, 1.4)]))
            for r, g, c, k in points]
    assert summary(rows)["P3O"] == {"start": [0.4, 0.5], "end": [0.9, 0.8], "calls_start": [0.5, 0.4],
                                    "calls_end": [1.0, 0.9], "kl": [1.2, 1.4], "rollouts": [10, 10]}

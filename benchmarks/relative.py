"""Learning from comparisons: P3O on a pairwise preference model against P3O on a scalar reward model, RLOO and
GRPO on the preference model's tournament, and offline DPO on the labelled pairs, on the embedded task.

    python benchmarks/relative.py            # 4 online arms x (2 KL strengths x 2 learning rates) x 5 seeds
                                             # + offline DPO x (2 betas x 2 learning rates) x 5 seeds
    python benchmarks/relative.py --quick    # every arm, 1 setting, 2 seeds, a few rollouts (CI-sized)

Every arm starts from the quickstart SFT export. The reward models (scalar: configs/quickstart/reward.yaml;
pairwise: configs/quickstart/preference.yaml) learn from the same 5000 labelled pairs, which offline DPO trains on
directly. The online arms get the frontier benchmark's budget (`benchmarks/frontier.py`): the same sampled
responses per rollout and in total, the same minibatches, evaluation on the same held-out prompts after every
rollout, and the same sweep (KL strength x learning rate), an arm's frontier for a seed being the envelope of its
sweep runs. Offline DPO samples nothing; it is evaluated every `--dpo-eval-every` optimizer steps over one epoch of
the pairs. Cost per rollout: comparisons asked of the reward (each pairwise comparison is two forwards, one per
order), and the median seconds of scoring and of a whole run.
Writes, under --out: points.csv, costs.csv, table.md, frontier.png.
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from frontier import report  # noqa: E402
from runs import DEFAULT_EXPORTS, ROOT, ensure_exports, quick_scratch, read_points, run_one, write_points  # noqa: E402

PAIRWISE = "pairwise"
# name -> (config, K responses per prompt, reward: 'scalar' or 'pairwise', objective overrides)
ARMS = {
    "P3O pairwise": ("configs/quickstart/p3o.yaml", 2, PAIRWISE, {}),
    "P3O scalar RM": ("configs/quickstart/p3o.yaml", 2, "scalar", {}),
    "RLOO tournament": ("configs/quickstart/rloo.yaml", 2, PAIRWISE, {}),
    "GRPO-4 tournament": ("configs/quickstart/grpo.yaml", 4, PAIRWISE, {"k": 4}),
}
OFFLINE = "offline DPO"
KL_SWEEP, LR_SWEEP = [0.02, 0.1], [3e-4, 1e-3]              # the frontier benchmark's sweep
DPO_BETAS, DPO_LRS = [0.1, 0.3], [1e-4, 3e-4]
BASELINE = "P3O pairwise"


def comparisons_per_rollout(k: int, reward: str, responses: int) -> tuple[int, int]:
    """(calls' items, scorer forwards) per rollout: a scalar reward scores each response once; a pairwise one asks
    K (K - 1) / 2 pairs per prompt, each pair two forwards (both orders)."""
    if reward != PAIRWISE:
        return responses, responses
    pairs = responses // k * k * (k - 1) // 2
    return pairs, 2 * pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every arm, 1 setting, 2 seeds (or --seeds), 3 rollouts")
    parser.add_argument("--arms", nargs="*", default=[*ARMS, OFFLINE], choices=[*ARMS, OFFLINE])
    parser.add_argument("--seeds", type=int, nargs="*", help="default: 0-4 (--quick: 0 1)")
    parser.add_argument("--rollouts", type=int, default=16)
    parser.add_argument("--responses-per-rollout", type=int, default=64)
    parser.add_argument("--minibatch-responses", type=int, default=16)
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--dpo-eval-every", type=int, default=16, help="offline DPO: optimizer steps per evaluation")
    parser.add_argument("--dpo-pairs", type=int, default=5000, help="offline DPO: labelled pairs (one epoch)")
    parser.add_argument("--exports", type=Path, default=DEFAULT_EXPORTS, help="directory with sft/, reward/, preference/")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/relative")
    parser.add_argument("--report-only", action="store_true", help="redo table.md and the figure from the CSVs")
    args = parser.parse_args()
    quick_scratch(parser, args, "out")
    if args.report_only:
        return write_report(read_points(args.out / "points.csv"), read_costs(args.out / "costs.csv"), args.out)
    sys.argv = sys.argv[:1]  # LightningCLI reads its own arguments from run_one's list
    kl_sweep, lr_sweep, betas, dpo_lrs = KL_SWEEP, LR_SWEEP, DPO_BETAS, DPO_LRS
    if args.quick:
        args.seeds = args.seeds or [0, 1]
        args.rollouts, args.responses_per_rollout, args.minibatch_responses = 3, 16, 8
        args.eval_prompts, args.dpo_eval_every, args.dpo_pairs = 16, 4, 64
        kl_sweep, lr_sweep, betas, dpo_lrs = [0.05], [1e-3], [0.1], [3e-4]
    args.seeds = args.seeds or [0, 1, 2, 3, 4]
    os.chdir(ROOT)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    (args.out / "configs").mkdir(parents=True, exist_ok=True)
    ensure_exports(args.exports, "relative", stages=("sft", "reward", "preference"))
    start, rows, costs = time.time(), [], []

    for name in [a for a in args.arms if a in ARMS]:
        config, k, reward, overrides = ARMS[name]
        model = {"reward": {"class_path": "modules.rewards.PreferenceModel",
                            "init_args": {"path": str(args.exports / "preference")}}} if reward == PAIRWISE else None
        for seed in args.seeds:
            for kl in kl_sweep:
                for lr in lr_sweep:
                    t0 = time.time()
                    run = run_one(config, f"{name.replace(' ', '_')}-kl{kl:g}-lr{lr:g}-s{seed}", seed, args.out,
                                  rollouts=args.rollouts, responses_per_rollout=args.responses_per_rollout,
                                  minibatch_responses=args.minibatch_responses, k=k, eval_every=1,
                                  eval_prompts=args.eval_prompts, exports=args.exports,
                                  objective={**overrides, "kl_coef": kl}, lr=lr, model=model)
                    seconds = time.time() - t0
                    rows.extend({"setting": "main", "objective": name, "knob": "kl_coef", "value": kl, "lr": lr,
                                 "seed": seed, **p} for p in run["points"])
                    asked, forwards = comparisons_per_rollout(k, reward, args.responses_per_rollout)
                    costs.append({"objective": name, "seed": seed, "run_s": seconds, "asked": asked,
                                  "forwards": forwards, "score_s": statistics.median(run["score_s"])})
                    end = run["points"][-1]
                    print(f"[relative] {name} kl={kl:g} lr={lr:g} seed={seed}: gold={end['gold']:.3f} "
                          f"kl={end['kl']:.2f} ({seconds:.0f}s, total {time.time() - start:.0f}s)", flush=True)
        write_points(rows, args.out), write_points(costs, args.out, "costs.csv")
    if OFFLINE in args.arms:
        for seed in args.seeds:
            for beta in betas:
                for lr in dpo_lrs:
                    t0 = time.time()
                    points = run_offline_dpo(args, seed, beta, lr)
                    rows.extend({"setting": "main", "objective": OFFLINE, "knob": "beta", "value": beta, "lr": lr,
                                 "seed": seed, **p} for p in points)
                    costs.append({"objective": OFFLINE, "seed": seed, "run_s": time.time() - t0, "asked": 0,
                                  "forwards": 0, "score_s": 0.0})
                    print(f"[relative] {OFFLINE} beta={beta:g} lr={lr:g} seed={seed}: gold={points[-1]['gold']:.3f} "
                          f"kl={points[-1]['kl']:.2f} ({time.time() - t0:.0f}s, total {time.time() - start:.0f}s)",
                          flush=True)
        write_points(rows, args.out), write_points(costs, args.out, "costs.csv")
    write_report(rows, costs, args.out)
    print(f"[relative] wrote {args.out}/table.md, points.csv, costs.csv, frontier.png in {time.time() - start:.0f}s")


def run_offline_dpo(args, seed: int, beta: float, lr: float) -> list[dict]:
    """One offline DPO run over one epoch of the labelled pairs, evaluated like the online arms."""
    import yaml

    from train import cli_main, derive_config

    source = "configs/quickstart/offline_dpo.yaml"
    callbacks = [cb for cb in yaml.safe_load(Path(source).read_text())["trainer"]["callbacks"]
                 if cb["class_path"].endswith("Evaluation")]
    callbacks[0]["init_args"].update(every_n_batches=args.dpo_eval_every, num_prompts=args.eval_prompts, show=0)
    tag = f"offline_dpo-beta{beta:g}-lr{lr:g}-s{seed}"
    config = derive_config(source, {
        "seed_everything": seed,
        "trainer": {"callbacks": callbacks, "enable_progress_bar": False, "enable_model_summary": False,
                    "enable_checkpointing": False, "logger": {"init_args": {"save_dir": str(args.out / "runs"),
                                                                             "name": tag}}},
        "model": {"init_args": {"policy": {"pretrained": str(args.exports / "sft")}, "beta": beta,
                                "optimizer": {"init_args": {"lr": lr}}}},
        "data": {"init_args": {"tokenizer": str(args.exports / "sft"), "seed": seed,
                               "source": {"init_args": {"num_train": args.dpo_pairs}}}},
    }, args.out / "configs" / f"{tag}.yaml")
    cli = cli_main(["fit", "--config", config])
    evaluation = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "Evaluation")
    return [{"rollout": h["step"], "samples": 0, "gold": h.get("val/gold_reward"), "proxy": None, "kl": h.get("val/kl"),
             "win_rate": h.get("val/win_rate"), "length": h.get("val/length")} for h in evaluation.history]


def read_costs(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return [{k: v if k == "objective" else float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def write_report(rows: list[dict], costs: list[dict], out: Path) -> None:
    """The frontier tables (with `BASELINE` as the paired baseline), then the cost per arm."""
    report(rows, out, baseline=BASELINE)
    lines = ["", "Cost per rollout: reward calls' items (responses, or pairs for a pairwise reward) and scorer "
             "forwards (a pair is asked in both orders); median seconds of a rollout's scoring and of a whole run "
             "(training plus evaluation after every rollout).", "",
             "| arm | items asked / rollout | scorer forwards / rollout | scoring s / rollout | s / run |",
             "|---|---|---|---|---|"]
    for name in dict.fromkeys(c["objective"] for c in costs):
        mine = [c for c in costs if c["objective"] == name]
        if name == OFFLINE:
            lines.append(f"| {name} | - (labelled pairs) | - | - | {statistics.median(c['run_s'] for c in mine):.1f} |")
            continue
        lines.append(f"| {name} | {int(mine[0]['asked'])} | {int(mine[0]['forwards'])} | "
                     f"{statistics.median(c['score_s'] for c in mine):.3f} | "
                     f"{statistics.median(c['run_s'] for c in mine):.1f} |")
    with open(out / "table.md", "a") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
    from modules.process import exit_process

    exit_process(0)        # no finalization: seconds saved, and gloo can abort there (see there)

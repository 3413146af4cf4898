"""KL-reward frontier of every objective on the embedded task, from the same SFT and reward exports.

    python benchmarks/frontier.py            # default sweep: 6 objectives x 3 KL strengths x 3 seeds
    python benchmarks/frontier.py --quick    # 1 KL strength, 1 seed, shorter runs (CI-sized)

Same budget for every objective: the same number of *sampled responses* per rollout and in total (prompts per
rollout = responses per rollout / K), the same number of responses per minibatch, the same number of updates per
rollout, and the same held-out evaluation prompts. Each objective runs from its quickstart YAML with only the
objective's KL strength (beta; for DPO its beta) and the budget overridden.
Writes, under --out: points.csv (every evaluation), frontier.png (gold and proxy reward vs KL),
table.md (gold reward reachable within fixed KL budgets, mean +- std over seeds).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (config, knob in the objective's init_args, K responses per prompt, sweep of the knob)
OBJECTIVES = {
    "P3O-V1": ("configs/quickstart/p3o_v1.yaml", "kl_coef", 2, [0.02, 0.05, 0.1]),
    "P3O-V2": ("configs/quickstart/p3o.yaml", "kl_coef", 2, [0.02, 0.05, 0.1]),
    "PPO": ("configs/quickstart/ppo.yaml", "kl_coef", 1, [0.02, 0.05, 0.1]),
    "OnlineDPO": ("configs/quickstart/dpo.yaml", "beta", 2, [0.05, 0.1, 0.3]),
    "RLOO": ("configs/quickstart/rloo.yaml", "kl_coef", 2, [0.02, 0.05, 0.1]),
    "GRPO": ("configs/quickstart/grpo.yaml", "kl_coef", 4, [0.02, 0.05, 0.1]),
}
BUDGETS = [1.0, 2.0, 4.0, 8.0]


def ensure_exports() -> None:
    from train import cli_main

    for stage in ("sft", "reward"):
        if not (ROOT / "artifacts/quickstart" / stage / "config.json").exists():
            print(f"[frontier] building the quickstart {stage} export")
            cli_main(["fit", "--config", f"configs/quickstart/{stage}.yaml", "--trainer.enable_progress_bar=false"])


def run_one(config: str, knob: str, value: float, k: int, seed: int, args, out: Path) -> list[dict]:
    """One training run; returns its evaluation points (the start, every few rollouts, the end)."""
    import yaml

    from train import cli_main, derive_config

    tag = f"{Path(config).stem}-{knob}{value}-s{seed}"
    callbacks = yaml.safe_load(Path(config).read_text())["trainer"]["callbacks"]
    for cb in callbacks:
        if cb["class_path"].endswith("Evaluation"):
            cb["init_args"].update(every_n_batches=args.eval_every_rollouts, num_prompts=args.eval_prompts, show=0)
        if cb["class_path"].endswith("HFExport"):
            cb["init_args"]["dirpath"] = str(out / "exports" / tag)
    derived = derive_config(config, {
        "seed_everything": seed,
        "trainer": {"max_steps": -1, "max_epochs": 1, "limit_train_batches": args.rollouts, "callbacks": callbacks,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": {"init_args": {"save_dir": str(out / "runs"), "name": tag}}},
        "model": {"init_args": {"seed": seed, "minibatch_groups": max(1, args.minibatch_responses // k),
                                "objective": {"init_args": {knob: value}}}},
        "data": {"init_args": {"batch_size": args.responses_per_rollout // k}},
    }, out / "configs" / f"{tag}.yaml")
    cli = cli_main(["fit", "--config", derived])
    evaluation = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "Evaluation")
    rollout = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "OnPolicyRollout")
    per_rollout = rollout.samples / max(rollout.rollouts, 1)
    return [{"step": h["step"], "samples": int(h["step"] * per_rollout),
             "gold": h.get("val/gold_reward"), "proxy": h.get("val/reward"), "kl": h.get("val/kl"),
             "win_rate": h.get("val/win_rate"), "length": h.get("val/length")} for h in evaluation.history]


def frontier_value(points: list[dict], budget: float, key: str = "gold") -> float | None:
    """Best reward among evaluation points whose KL is within the budget (the frontier at that KL)."""
    inside = [p[key] for p in points if p["kl"] is not None and p["kl"] <= budget]
    return max(inside) if inside else None


def write_outputs(rows: list[dict], out: Path) -> None:
    with open(out / "points.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    names = list(dict.fromkeys(r["objective"] for r in rows))
    lines = ["| objective | " + " | ".join(f"gold @ KL<={b:g}" for b in BUDGETS) + " | best proxy |",
             "|---" * (len(BUDGETS) + 2) + "|"]
    for name in names:
        seeds = sorted({r["seed"] for r in rows if r["objective"] == name})
        cells = []
        for b in BUDGETS:
            vals = [v for s in seeds if (v := frontier_value([r for r in rows if r["objective"] == name
                                                               and r["seed"] == s], b)) is not None]
            cells.append(_mean_std(vals))
        proxy = [max(r["proxy"] for r in rows if r["objective"] == name and r["seed"] == s) for s in seeds]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_mean_std(proxy)} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, names, out / "frontier.png")


def _mean_std(vals: list[float]) -> str:
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"


def plot(rows: list[dict], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "gold", "gold reward (VADER)"), (axes[1], "proxy", "proxy reward (RM, normalised)")):
        for name in names:
            mine = [r for r in rows if r["objective"] == name]
            seeds = sorted({r["seed"] for r in mine})
            grid = sorted({r["kl"] for r in mine})
            xs = [x for x in grid if x >= 0] or grid
            # frontier per seed on a common KL grid, then mean and spread across seeds
            budgets = sorted(set(round(x, 2) for x in xs))
            curves = [[frontier_value([r for r in mine if r["seed"] == s], b, key) for b in budgets] for s in seeds]
            mean, lo, hi, bx = [], [], [], []
            for i, b in enumerate(budgets):
                vals = [c[i] for c in curves if c[i] is not None]
                if vals:
                    bx.append(b), mean.append(statistics.mean(vals)), lo.append(min(vals)), hi.append(max(vals))
            line, = ax.plot(bx, mean, "-", label=name)
            ax.fill_between(bx, lo, hi, color=line.get_color(), alpha=0.15)
            ax.scatter([r["kl"] for r in mine], [r[key] for r in mine], s=6, color=line.get_color(), alpha=0.5)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("KL(policy || SFT) [nats, Monte-Carlo]")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("KL-reward frontier on the embedded review task (best reward reachable within a KL budget)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 KL strength (the middle one), 1 seed, 12 rollouts")
    parser.add_argument("--objectives", nargs="*", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--rollouts", type=int, default=30)
    parser.add_argument("--responses-per-rollout", type=int, default=64)
    parser.add_argument("--minibatch-responses", type=int, default=16)
    parser.add_argument("--eval-every-rollouts", type=int, default=5)
    parser.add_argument("--eval-prompts", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/frontier")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # LightningCLI reads its own arguments from run_one's list
    if args.quick:
        args.seeds, args.rollouts, args.eval_every_rollouts, args.eval_prompts = [0], 12, 4, 64
    os.chdir(ROOT)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    (args.out / "configs").mkdir(parents=True, exist_ok=True)
    ensure_exports()
    rows, start = [], time.time()
    for name in args.objectives:
        config, knob, k, sweep = OBJECTIVES[name]
        for value in (sweep[len(sweep) // 2:][:1] if args.quick else sweep):
            for seed in args.seeds:
                t0 = time.time()
                for point in run_one(config, knob, value, k, seed, args, args.out):
                    rows.append({"objective": name, "knob": knob, "value": value, "seed": seed, **point})
                print(f"[frontier] {name} {knob}={value} seed={seed}: gold={rows[-1]['gold']:.3f} "
                      f"kl={rows[-1]['kl']:.2f} ({time.time() - t0:.0f}s, total {time.time() - start:.0f}s)")
                write_outputs(rows, args.out)
    print(f"[frontier] wrote {args.out}/points.csv, table.md, frontier.png in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()

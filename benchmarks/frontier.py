"""KL-reward frontier of every objective on the embedded task, from the same SFT and reward exports.

    python benchmarks/frontier.py            # 9 objectives x (2 KL strengths x 2 learning rates) x 5 seeds
                                             # + over-optimisation against a weak reward model (see README for time)
    python benchmarks/frontier.py --quick    # 2 objectives, 1 setting, 2 seeds, a few rollouts (CI-sized)
    python benchmarks/frontier.py --objectives P3O-V2 'P3O-V2 forks 0.2' GRPO-4 'GRPO-4 forks 0.2' --seeds 0 1 2 \
        --out benchmarks/results/frontier/forks   # forking tokens (not in the default run; results/frontier/forks)
    python benchmarks/frontier.py --objectives P3O-V2 'P3O-V2 8-bit AdamW' GRPO-4 'GRPO-4 8-bit AdamW' \
        --seeds 0 1 2 --out benchmarks/results/frontier/adamw8bit   # the 8-bit optimizer (results/frontier/adamw8bit)
    python benchmarks/frontier.py --objectives P3O-V2 'P3O-V2 bf16-mixed' GRPO-4 'GRPO-4 bf16-mixed' \
        --seeds 0 1 2 --out benchmarks/results/frontier/bf16   # bf16 autocast (configs/presets/bf16.yaml; results/frontier/bf16)

Budget, the same for every objective: the same number of *sampled responses* per rollout and in total (prompts
per rollout = responses per rollout / K), the same number of responses per minibatch and of updates per rollout,
and the same held-out evaluation prompts, evaluated before training and after *every* rollout. What moves a run
along the frontier is swept: the KL strength (beta; DPO's beta) and the learning rate. An objective's frontier
for one seed is the envelope of all its sweep runs with that seed: the best gold reward reachable within a KL
budget. Reported per objective, with bootstrap 95% intervals over seeds (`benchmarks/stats.py`):
  * gold reward within KL budgets {0.5, 1, 2, 4, 8} and the area under the gold-vs-KL frontier up to KL 8
    (divided by 8: the mean best gold over budgets), and the paired difference P3O-V2 minus each objective;
  * over-optimisation: every objective's most aggressive setting trained against a *weak* reward model (trained
    on `--weak-labels` preference pairs instead of 5000), gold and proxy reward against KL on the same axes,
    peak gold, gold at the end and the KL there.
Writes, under --out: points.csv, table.md, frontier.png, overoptimisation.png.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runs import DEFAULT_EXPORTS, ROOT, ensure_exports, panel_figure, quick_scratch, read_points, run_one, write_points  # noqa: E402
from stats import bootstrap_ci, fmt_ci, frontier_at, frontier_auc, paired_ci  # noqa: E402

ADAMW_8BIT = {"class_path": "bitsandbytes.optim.AdamW8bit"}
# name -> (config, K responses per prompt, KL knob of the objective, objective overrides[, RL module overrides
# [, trainer overrides]])
OBJECTIVES = {
    "P3O-V2": ("configs/quickstart/p3o.yaml", 2, "kl_coef", {}),
    "P3O-V1": ("configs/quickstart/p3o_v1.yaml", 2, "kl_coef", {}),
    "PPO": ("configs/quickstart/ppo.yaml", 1, "kl_coef", {}),
    "OnlineDPO": ("configs/quickstart/dpo.yaml", 2, "beta", {}),
    "RLOO": ("configs/quickstart/rloo.yaml", 2, "kl_coef", {}),
    "GRPO-2": ("configs/quickstart/grpo.yaml", 2, "kl_coef", {"k": 2}),
    "P3O-4": ("configs/quickstart/p3o.yaml", 4, "kl_coef", {"k": 4}),
    "RLOO-4": ("configs/quickstart/rloo.yaml", 4, "kl_coef", {"k": 4}),
    "GRPO-4": ("configs/quickstart/grpo.yaml", 4, "kl_coef", {"k": 4}),
    # the policy gradient through the top-20% tokens by entropy alone (`top_entropy_quantile`, TRL's suggested rho)
    "P3O-V2 forks 0.2": ("configs/quickstart/p3o.yaml", 2, "kl_coef", {}, {"top_entropy_quantile": 0.2}),
    # the same with P3O's KL in the loss (`kl_in_loss`): its gradient on every token, as GRPO's KL term has
    "P3O-V2 forks 0.2, KL in loss": ("configs/quickstart/p3o.yaml", 2, "kl_coef", {"kl_in_loss": True},
                                     {"top_entropy_quantile": 0.2}),
    "GRPO-4 forks 0.2": ("configs/quickstart/grpo.yaml", 4, "kl_coef", {"k": 4}, {"top_entropy_quantile": 0.2}),
    # bitsandbytes' 8-bit AdamW (`configs/presets/adamw_8bit.yaml`) in place of AdamW, the same lr, betas, decay
    "P3O-V2 8-bit AdamW": ("configs/quickstart/p3o.yaml", 2, "kl_coef", {}, {"optimizer": ADAMW_8BIT}),
    "GRPO-4 8-bit AdamW": ("configs/quickstart/grpo.yaml", 4, "kl_coef", {"k": 4}, {"optimizer": ADAMW_8BIT}),
    # bf16 autocast (`configs/presets/bf16.yaml`): matmuls in bf16, weights and optimizer state fp32
    "P3O-V2 bf16-mixed": ("configs/quickstart/p3o.yaml", 2, "kl_coef", {}, {}, {"precision": "bf16-mixed"}),
    "GRPO-4 bf16-mixed": ("configs/quickstart/grpo.yaml", 4, "kl_coef", {"k": 4}, {}, {"precision": "bf16-mixed"}),
}
DEFAULT = [name for name, arm in OBJECTIVES.items() if len(arm) == 4]   # the objectives as shipped
KL_SWEEP = {"kl_coef": [0.02, 0.1], "beta": [0.05, 0.3]}   # weak and strong pull towards the SFT policy
LR_SWEEP = [3e-4, 1e-3]
BUDGETS = [0.5, 1.0, 2.0, 4.0, 8.0]
BASELINE = "P3O-V2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="P3O-V2, GRPO-4; 1 setting; 2 seeds; 4 rollouts")
    parser.add_argument("--objectives", nargs="*", default=DEFAULT, choices=list(OBJECTIVES),
                        help="default: the 9 objectives as shipped (the 'forks', '8-bit AdamW' and 'bf16-mixed' "
                             "arms: on request)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    parser.add_argument("--rollouts", type=int, default=16)
    parser.add_argument("--responses-per-rollout", type=int, default=64)
    parser.add_argument("--minibatch-responses", type=int, default=16)
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--weak-labels", type=int, default=300, help="preference pairs of the weak reward model")
    parser.add_argument("--weak-rollouts", type=int, default=24)
    parser.add_argument("--exports", type=Path, default=DEFAULT_EXPORTS, help="directory with sft/ and reward/")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/frontier")
    parser.add_argument("--report-only", action="store_true", help="redo table.md and the figures from points.csv")
    args = parser.parse_args()
    quick_scratch(parser, args, "out")
    if args.report_only:
        return report(read_points(args.out / "points.csv"), args.out)
    sys.argv = sys.argv[:1]  # LightningCLI reads its own arguments from run_one's list
    kl_sweep, lr_sweep = KL_SWEEP, LR_SWEEP
    if args.quick:
        args.objectives, args.seeds = ["P3O-V2", "GRPO-4"], [0, 1]
        args.rollouts, args.weak_rollouts, args.responses_per_rollout, args.minibatch_responses = 4, 4, 16, 8
        args.eval_prompts, args.weak_labels = 16, 64
        kl_sweep, lr_sweep = {"kl_coef": [0.05], "beta": [0.1]}, [1e-3]
    os.chdir(ROOT)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    (args.out / "configs").mkdir(parents=True, exist_ok=True)
    ensure_exports(args.exports, "frontier")
    start, rows = time.time(), []

    def train(name: str, knob_value: float, lr: float, seed: int, setting: str, rollouts: int, reward: Path):
        config, k, knob, overrides, module, trainer = (*OBJECTIVES[name], {}, {})[:6]
        t0 = time.time()
        run = run_one(config, f"{setting}-{name}-{knob}{knob_value:g}-lr{lr:g}-s{seed}", seed, args.out,
                      rollouts=rollouts, responses_per_rollout=args.responses_per_rollout,
                      minibatch_responses=args.minibatch_responses, k=k, eval_every=1, eval_prompts=args.eval_prompts,
                      exports=args.exports, objective={**overrides, knob: knob_value}, lr=lr,
                      model={"reward": {"class_path": "modules.rewards.RewardModel",
                                        "init_args": {"path": str(reward), "normalize": True}}, **module},
                      trainer=trainer)
        rows.extend({"setting": setting, "objective": name, "knob": knob, "value": knob_value, "lr": lr, "seed": seed,
                     **p} for p in run["points"])
        end = run["points"][-1]
        print(f"[frontier] {setting} {name} {knob}={knob_value:g} lr={lr:g} seed={seed}: gold={end['gold']:.3f} "
              f"proxy={end['proxy']:.3f} kl={end['kl']:.2f} ({time.time() - t0:.0f}s, total {time.time() - start:.0f}s)",
              flush=True)

    for name in args.objectives:
        knob = OBJECTIVES[name][2]
        for seed in args.seeds:
            for value in kl_sweep[knob]:
                for lr in lr_sweep:
                    train(name, value, lr, seed, "main", args.rollouts, args.exports / "reward")
        write_points(rows, args.out)
    weak = build_weak_reward(args)
    for name in args.objectives:
        knob = OBJECTIVES[name][2]
        for seed in args.seeds:   # the most aggressive setting: weakest KL pull, highest learning rate
            train(name, min(kl_sweep[knob]), max(lr_sweep), seed, "weak", args.weak_rollouts, weak)
        write_points(rows, args.out)
    report(rows, args.out)
    print(f"[frontier] wrote {args.out}/table.md, points.csv, frontier.png, overoptimisation.png in "
          f"{time.time() - start:.0f}s")


def build_weak_reward(args) -> Path:
    """The quickstart reward stage on only `weak_labels` preference pairs (1 epoch more than needed to fit them):
    a proxy that ranks SFT samples worse, so optimising it far enough lowers the gold reward."""
    from train import cli_main, derive_config

    path = args.out / "exports" / f"reward_weak{args.weak_labels}"
    if (path / "config.json").exists():
        return path
    import yaml

    source = "configs/quickstart/reward.yaml"
    callbacks = [cb for cb in yaml.safe_load(Path(source).read_text())["trainer"]["callbacks"]
                 if not cb["class_path"].endswith("StepCheckpoint")]
    for cb in callbacks:
        if cb["class_path"].endswith("HFExport"):
            cb["init_args"]["dirpath"] = str(path)
    config = derive_config(source, {
        "trainer": {"max_epochs": 4, "callbacks": callbacks, "enable_progress_bar": False, "enable_checkpointing": False,
                    "enable_model_summary": False, "logger": {"init_args": {"save_dir": str(args.out / "runs"),
                                                                             "name": "reward_weak"}}},
        "model": {"init_args": {"backbone": {"pretrained": str(args.exports / "sft")}}},
        "data": {"init_args": {"tokenizer": str(args.exports / "sft"), "batch_size": 16,
                               "source": {"init_args": {"num_train": args.weak_labels}}}},
    }, args.out / "configs" / "reward_weak.yaml")
    print(f"[frontier] training the weak reward model on {args.weak_labels} preference pairs")
    cli_main(["fit", "--config", config])
    return path


def per_seed(rows: list[dict], setting: str, name: str) -> dict[int, list[dict]]:
    """Evaluation points of one objective, grouped by seed (all sweep runs of a seed together)."""
    out: dict[int, list[dict]] = {}
    for r in rows:
        if r["setting"] == setting and r["objective"] == name:
            out.setdefault(r["seed"], []).append(r)
    return out


def report(rows: list[dict], out: Path, baseline: str = BASELINE) -> None:
    names = list(dict.fromkeys(r["objective"] for r in rows))
    metrics: dict[str, dict[str, dict[int, float]]] = {}
    for name in names:
        seeds = per_seed(rows, "main", name)
        m = {f"gold@{b:g}": {s: frontier_at(p, b) for s, p in seeds.items()} for b in BUDGETS}
        m["auc"] = {s: frontier_auc(p, 8.0) for s, p in seeds.items()}
        metrics[name] = {key: {s: v for s, v in by_seed.items() if v is not None} for key, by_seed in m.items()}
    keys = [f"gold@{b:g}" for b in BUDGETS] + ["auc"]
    n_seeds = max(len(v["auc"]) for v in metrics.values())
    lines = [f"Gold reward reachable within a KL budget and area under the gold-vs-KL frontier up to KL 8 (/8): mean "
             f"over {n_seeds} seeds [bootstrap 95% interval].", "",
             "| objective | " + " | ".join(f"gold @ KL<={b:g}" for b in BUDGETS) + " | AUC (KL<=8) |",
             "|---" * (len(keys) + 1) + "|"]
    for name in names:
        cells = [fmt_ci(bootstrap_ci(list(metrics[name][k].values()))) if metrics[name][k] else "n/a" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if baseline in metrics:
        lines += ["", f"Paired differences {baseline} minus each objective (same seeds) [bootstrap 95% interval]; an "
                  "interval that excludes 0 is a difference the seeds resolve.", "",
                  "| objective | " + " | ".join(f"Δ gold @ KL<={b:g}" for b in BUDGETS) + " | Δ AUC |",
                  "|---" * (len(keys) + 1) + "|"]
        for name in names:
            if name != baseline:
                cells = [fmt_ci(paired_ci(metrics[baseline][k], metrics[name][k])) for k in keys]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
    weak_names = [n for n in names if per_seed(rows, "weak", n)]
    if weak_names:
        lines += ["", "Over-optimisation against the weak reward model (most aggressive setting): peak gold during "
                  "training, gold, proxy and KL at the end [bootstrap 95% interval].", "",
                  "| objective | peak gold | gold at end | gold drop from peak | proxy at end | KL at end |",
                  "|---|---|---|---|---|---|"]
        for name in weak_names:
            seeds = per_seed(rows, "weak", name)
            ends = {s: max(p, key=lambda r: r["rollout"]) for s, p in seeds.items()}
            peak = {s: max(r["gold"] for r in p) for s, p in seeds.items()}
            cols = [peak, {s: e["gold"] for s, e in ends.items()}, {s: peak[s] - e["gold"] for s, e in ends.items()},
                    {s: e["proxy"] for s, e in ends.items()}, {s: e["kl"] for s, e in ends.items()}]
            lines.append(f"| {name} | " + " | ".join(fmt_ci(bootstrap_ci(list(c.values()))) for c in cols) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot_frontier(rows, names, out / "frontier.png")
    if weak_names:
        plot_overoptimisation(rows, weak_names, out / "overoptimisation.png")


def plot_frontier(rows: list[dict], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [0.0] + [b / 8 for b in range(1, 65)]          # KL budgets 0 .. 8
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name in names:
        seeds = per_seed(rows, "main", name)
        xs, mean, low, high = [], [], [], []
        for b in grid:
            vals = [v for p in seeds.values() if (v := frontier_at(p, b)) is not None]
            if len(vals) == len(seeds):
                m, lo, hi = bootstrap_ci(vals, resamples=2000)
                xs.append(b), mean.append(m), low.append(lo), high.append(hi)
        line, = ax.plot(xs, mean, "-", label=name, lw=1.6 if name.startswith("P3O") else 1.0)
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.12)
    ax.set_xlabel("KL budget: KL(policy || SFT) [nats, Monte-Carlo]")
    ax.set_ylabel("best gold reward within the budget")
    ax.set_title("Gold-reward frontier, mean over seeds with bootstrap 95% bands")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_overoptimisation(rows: list[dict], names: list[str], path: Path) -> None:
    def draw(ax, name):
        seeds = per_seed(rows, "weak", name)
        for seed, points in sorted(seeds.items()):
            points = sorted(points, key=lambda r: r["rollout"])
            kl, first = [p["kl"] for p in points], seed == min(seeds)
            ax.plot(kl, [p["gold"] for p in points], "-", color="tab:green", alpha=0.7, lw=1,
                    label="gold" if first else None)
            ax.plot(kl, [p["proxy"] for p in points], "--", color="tab:purple", alpha=0.7, lw=1,
                    label="proxy (weak RM)" if first else None)
        ax.set_xscale("symlog", linthresh=10)      # linear to KL 10, then logarithmic (some runs reach KL 100+)

    panel_figure(names, draw, "Over-optimisation: gold and proxy reward vs KL against a weak reward model (each "
                 "line a seed)", path, sharey=True)


if __name__ == "__main__":
    main()
    from modules.process import exit_process

    exit_process(0)        # no finalization: seconds saved, and gloo can abort there (see there)

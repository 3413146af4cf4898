"""SmolLM2-135M-Instruct (LoRA, CPU): P3O-V2 against PPO and GRPO-2 from the same SFT and reward exports.

    python benchmarks/smollm2.py            # 3 objectives x 2 learning rates x 12 rollouts x 16 responses, seed 0
                                            # (~40 min on 2 cores, + ~13 min for the exports if artifacts/smollm2
                                            # lacks them)
    python benchmarks/smollm2.py --quick    # 1 learning rate, 2 rollouts x 8 responses against --exports (CI-sized)
    python benchmarks/smollm2.py --report-only   # table.md and curves.png again from points.csv

Each objective runs its `configs/smollm2/<name>.yaml` at the same budget: the same number of sampled responses
per rollout (P3O and GRPO: 8 prompts x 2; PPO: 16 prompts x 1), the same minibatch of 16 responses, 2 epochs,
the same rollouts and KL coefficient, and the same held-out prompts, evaluated before training and every
`--eval-every` rollouts; each at every learning rate of `--lrs` (the configs' 3e-4 and a larger one: the
objectives' steps differ in size at the same learning rate, so one rate alone compares how far they move, not
what they reach). One seed: on CPU this is a measurement of one run each, not a ranking (the embedded-task
frontier, `benchmarks/frontier.py`, has the seeds and intervals).
Writes, under --out: points.csv; table.md: every run at its end (gold, proxy, KL, win rate vs SFT, length,
wall time), and each objective's best gold within KL budgets over all its runs (its frontier), up to the
largest KL every objective reached; curves.png (gold and proxy reward against KL, per objective).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runs import ROOT, ensure_exports, panel_figure, quick_scratch, read_points, run_one, write_points  # noqa: E402
from stats import frontier_at  # noqa: E402

# name -> (config, K responses per prompt)
OBJECTIVES = {
    "P3O-V2": ("configs/smollm2/p3o.yaml", 2),
    "PPO": ("configs/smollm2/ppo.yaml", 1),
    "GRPO-2": ("configs/smollm2/grpo.yaml", 2),
}
BUDGETS = [0.5, 1.0, 2.0, 4.0, 8.0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 learning rate, 2 rollouts x 8 responses, 8 prompts")
    parser.add_argument("--objectives", nargs="*", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    parser.add_argument("--lrs", type=float, nargs="*", default=[3e-4, 1e-3])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rollouts", type=int, default=12)
    parser.add_argument("--responses-per-rollout", type=int, default=16)
    parser.add_argument("--minibatch-responses", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=3)
    parser.add_argument("--eval-prompts", type=int, default=32)
    parser.add_argument("--exports", type=Path, default=ROOT / "artifacts/smollm2", help="directory with sft/ and reward/")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/smollm2")
    parser.add_argument("--report-only", action="store_true",
                        help="redo table.md and curves.png from points.csv (give the --eval-prompts of the run)")
    args = parser.parse_args()
    quick_scratch(parser, args, "out")
    if args.report_only:
        return report(read_points(args.out / "points.csv"), args.out, args.eval_prompts)
    sys.argv = sys.argv[:1]  # LightningCLI reads its own arguments from run_one's list
    if args.quick:
        args.lrs, args.rollouts, args.responses_per_rollout, args.minibatch_responses = args.lrs[:1], 2, 8, 8
        args.eval_every, args.eval_prompts = 1, 8
    os.chdir(ROOT)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    (args.out / "configs").mkdir(parents=True, exist_ok=True)
    ensure_exports(args.exports, "smollm2", family="smollm2")
    start, rows = time.time(), []
    for lr in args.lrs:
        for name in args.objectives:
            config, k = OBJECTIVES[name]
            t0 = time.time()
            run = run_one(config, f"{name}-lr{lr:g}", args.seed, args.out, rollouts=args.rollouts,
                          responses_per_rollout=args.responses_per_rollout,
                          minibatch_responses=args.minibatch_responses, k=k, eval_every=args.eval_every,
                          eval_prompts=args.eval_prompts, exports=args.exports, lr=lr)
            wall = time.time() - t0
            rows.extend({"objective": name, "lr": lr, "seed": args.seed, **p, "wall_s": round(wall, 1)}
                        for p in run["points"])
            end = run["points"][-1]
            print(f"[smollm2] {name} lr={lr:g}: gold={end['gold']:.3f} proxy={end['proxy']:.3f} kl={end['kl']:.2f} "
                  f"win={end['win_rate']:.2f} ({wall:.0f}s, total {time.time() - start:.0f}s)", flush=True)
            write_points(rows, args.out)
    report(rows, args.out, args.eval_prompts)
    print(f"[smollm2] wrote {args.out}/table.md, points.csv, curves.png in {time.time() - start:.0f}s")


def report(rows: list[dict], out: Path, n_prompts: int) -> None:
    names = list(dict.fromkeys(r["objective"] for r in rows))
    runs: dict[tuple[str, float], list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["rollout"]):
        runs.setdefault((r["objective"], r["lr"]), []).append(r)
    start = next(iter(runs.values()))[0]
    lines = [f"SmolLM2-135M-Instruct, LoRA, seed {start['seed']}: the SFT policy (rollout 0) and every run after its "
             f"last rollout, on the same {n_prompts} held-out prompts. Win rate: gold reward against a response of the "
             "SFT policy to the same prompt (ties count half); the SFT row is the SFT policy against its own second "
             f"sample, i.e. 0.5 up to sampling noise (standard error ~{0.5 / n_prompts ** 0.5:.2f}).", "",
             "| objective | lr | rollouts x responses | gold | proxy | KL | win rate vs SFT | length | wall |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| SFT | | 0 | {start['gold']:.3f} | {start['proxy']:.3f} | {start['kl']:.2f} | {start['win_rate']:.2f} | "
             f"{start['length']:.1f} | |"]
    for (name, lr), points in runs.items():
        end = points[-1]
        minutes, seconds = divmod(round(end["wall_s"]), 60)
        lines.append(f"| {name} | {lr:g} | {end['rollout']} x {end['samples'] // max(end['rollout'], 1)} | "
                     f"{end['gold']:.3f} | {end['proxy']:.3f} | {end['kl']:.2f} | {end['win_rate']:.2f} | "
                     f"{end['length']:.1f} | {minutes} min {seconds:02d} s |")
    # An objective's frontier: its best gold within a KL budget over all its runs (every evaluation point).
    reach = min(max(r["kl"] for r in rows if r["objective"] == name) for name in names)
    budgets = [b for b in BUDGETS if b < reach] + [round(reach, 2)]
    lines += ["", f"Best gold within a KL budget over all of an objective's runs and evaluations, up to {reach:.2f}, the "
              "largest KL every objective reached:", "",
              "| objective | " + " | ".join(f"gold @ KL<={b:g}" for b in budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    for name in names:
        points = [r for r in rows if r["objective"] == name]
        cells = [frontier_at(points, b) for b in budgets]
        lines.append(f"| {name} | " + " | ".join("n/a" if c is None else f"{c:.3f}" for c in cells) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    def draw(ax, name):
        for (objective, lr), points in runs.items():
            if objective == name:
                kl = [p["kl"] for p in points]
                line, = ax.plot(kl, [p["gold"] for p in points], "o-", label=f"gold, lr {lr:g}")
                ax.plot(kl, [p["proxy"] for p in points], "s--", color=line.get_color(), alpha=0.6,
                        label=f"proxy, lr {lr:g}")

    panel_figure(names, draw, "SmolLM2-135M-Instruct: gold (solid) and proxy (dashed) reward vs KL, a point per "
                 "evaluation", out / "curves.png", sharey=True)


if __name__ == "__main__":
    main()
    from modules.process import exit_process

    exit_process(0)        # no finalization: seconds saved, and gloo can abort there (see there)

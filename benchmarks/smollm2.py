"""SmolLM2-135M-Instruct (LoRA, CPU): P3O-V2 against PPO and GRPO-2 from the same SFT and reward exports.

    python benchmarks/smollm2.py            # 3 objectives x 12 rollouts x 16 responses, seed 0 (~1 h on 2 cores,
                                            # plus ~16 min for the exports if artifacts/smollm2 lacks them)
    python benchmarks/smollm2.py --quick    # 2 rollouts x 8 responses against --exports (CI-sized)
    python benchmarks/smollm2.py --report-only   # table.md and curves.png again from points.csv

Each objective runs its `configs/smollm2/<name>.yaml` at the same budget: the same number of sampled responses
per rollout (P3O and GRPO: 8 prompts x 2; PPO: 16 prompts x 1), the same minibatch of 16 responses, 2 epochs,
the same rollouts, learning rate and KL coefficient, and the same held-out prompts, evaluated before training
and every `--eval-every` rollouts. One seed per objective: on CPU this is a measurement of one run each, not a
ranking (the embedded-task frontier, `benchmarks/frontier.py`, has the seeds and intervals).
Writes, under --out: points.csv, table.md (gold, proxy, KL, win rate vs SFT, length and wall time at the end,
and each objective's best gold within the smallest end-KL of all objectives: a comparison at matched KL),
curves.png (gold and proxy reward against KL per objective).
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stats import frontier_at  # noqa: E402

from runs import ROOT, ensure_exports, panel_figure, run_one  # noqa: E402

# name -> (config, K responses per prompt)
OBJECTIVES = {
    "P3O-V2": ("configs/smollm2/p3o.yaml", 2),
    "PPO": ("configs/smollm2/ppo.yaml", 1),
    "GRPO-2": ("configs/smollm2/grpo.yaml", 2),
}
COLUMNS = ["objective", "seed", "rollout", "samples", "gold", "proxy", "kl", "win_rate", "length", "wall_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 rollouts x 8 responses, 8 evaluation prompts")
    parser.add_argument("--objectives", nargs="*", default=list(OBJECTIVES), choices=list(OBJECTIVES))
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
    if args.report_only:
        return report(read_points(args.out / "points.csv"), args.out, args.eval_prompts)
    sys.argv = sys.argv[:1]  # LightningCLI reads its own arguments from run_one's list
    if args.quick:
        args.rollouts, args.responses_per_rollout, args.minibatch_responses = 2, 8, 8
        args.eval_every, args.eval_prompts = 1, 8
    os.chdir(ROOT)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    (args.out / "configs").mkdir(parents=True, exist_ok=True)
    ensure_exports(args.exports, "smollm2", family="smollm2")
    start, rows = time.time(), []
    for name in args.objectives:
        config, k = OBJECTIVES[name]
        t0 = time.time()
        run = run_one(config, name, args.seed, args.out, rollouts=args.rollouts,
                      responses_per_rollout=args.responses_per_rollout, minibatch_responses=args.minibatch_responses,
                      k=k, eval_every=args.eval_every, eval_prompts=args.eval_prompts, exports=args.exports)
        wall = time.time() - t0
        rows.extend({"objective": name, "seed": args.seed, **p, "wall_s": round(wall, 1)} for p in run["points"])
        end = run["points"][-1]
        print(f"[smollm2] {name}: gold={end['gold']:.3f} proxy={end['proxy']:.3f} kl={end['kl']:.2f} "
              f"win={end['win_rate']:.2f} ({wall:.0f}s, total {time.time() - start:.0f}s)", flush=True)
        write_points(rows, args.out)
    report(rows, args.out, args.eval_prompts)
    print(f"[smollm2] wrote {args.out}/table.md, points.csv, curves.png in {time.time() - start:.0f}s")


def write_points(rows: list[dict], out: Path) -> None:
    with open(out / "points.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def read_points(path: Path) -> list[dict]:
    """points.csv back into typed rows."""
    def typed(key: str, value: str):
        if key == "objective":
            return value
        return int(value) if key in ("seed", "rollout", "samples") else float(value)

    with open(path, newline="") as handle:
        return [{k: typed(k, v) for k, v in row.items()} for row in csv.DictReader(handle)]


def report(rows: list[dict], out: Path, n_prompts: int) -> None:
    names = list(dict.fromkeys(r["objective"] for r in rows))
    start = min((r for r in rows if r["objective"] == names[0]), key=lambda r: r["rollout"])
    runs = {name: sorted((r for r in rows if r["objective"] == name), key=lambda r: r["rollout"]) for name in names}
    budget = min(points[-1]["kl"] for points in runs.values())        # the smallest KL any objective ended at
    lines = [f"SmolLM2-135M-Instruct, LoRA, seed {start['seed']}: the SFT policy (rollout 0) and each objective after "
             f"its last rollout, on the same {n_prompts} held-out prompts. Win rate: gold reward against a response "
             "of the SFT policy to the same prompt (ties count half); the SFT row is the SFT policy against its own "
             f"second sample, i.e. 0.5 up to sampling noise (standard error ~{0.5 / n_prompts ** 0.5:.2f}).", "",
             f"| objective | rollouts x responses | gold | proxy | KL | win rate vs SFT | length | gold @ KL<={budget:.2f} "
             "(at KL) | wall |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| SFT | 0 | {start['gold']:.3f} | {start['proxy']:.3f} | {start['kl']:.2f} | {start['win_rate']:.2f} | "
             f"{start['length']:.1f} | | |"]
    for name, points in runs.items():
        end = points[-1]
        gold = frontier_at(points, budget)
        at = next((f"{gold:.3f} ({p['kl']:.2f})" for p in points if p["kl"] <= budget and p["gold"] == gold), "n/a")
        minutes, seconds = divmod(round(end["wall_s"]), 60)
        lines.append(f"| {name} | {end['rollout']} x {end['samples'] // max(end['rollout'], 1)} | {end['gold']:.3f} | "
                     f"{end['proxy']:.3f} | {end['kl']:.2f} | {end['win_rate']:.2f} | {end['length']:.1f} | "
                     f"{at} | {minutes} min {seconds:02d} s |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    def draw(ax, name):
        points = runs[name]
        kl = [p["kl"] for p in points]
        ax.plot(kl, [p["gold"] for p in points], "o-", color="tab:green", label="gold")
        ax.plot(kl, [p["proxy"] for p in points], "s--", color="tab:purple", label="proxy (reward model)")

    panel_figure(names, draw, "SmolLM2-135M-Instruct: gold and proxy reward vs KL (a point per evaluation)",
                 out / "curves.png", sharey=True)


if __name__ == "__main__":
    main()

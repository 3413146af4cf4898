"""Shift invariance end to end: every objective trained on the proxy reward plus a per-prompt offset delta(x).

    python benchmarks/invariance.py            # 6 objectives x scales {0, 1, 4, 16} x 2 seeds (~15-20 min, 2 cores)
    python benchmarks/invariance.py --quick    # P3O-V2 and PPO, scales {0, 16}, 1 seed, 4 rollouts (CI-sized)

The training reward is `modules.rewards.PromptShift` around the quickstart reward model (normalised: std 1 on
SFT samples, so `scale` is in reward std units): r'(x, y) = r(x, y) + scale * z(x), z(x) ~ N(0, 1) a fixed
function of the prompt text. Same seeds, same budget, same held-out evaluation for every scale. For each
objective and scale: the gold reward and KL at the end, the gold reward reachable within KL 2 and 4, and against
the same objective and seed at scale 0: the largest weight difference after the first rollout's updates, the
number of leading rollouts whose sampled responses are identical, and the largest weight difference at the end.
Writes, under --out: table.md, points.csv, invariance.png (gold vs KL per objective, one curve per scale).
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runs import DEFAULT_EXPORTS, ROOT, ensure_exports, panel_figure, quick_scratch, run_one, write_points  # noqa: E402
from stats import frontier_at  # noqa: E402

# name -> (config, K responses per prompt)
OBJECTIVES = {
    "P3O-V2": ("configs/quickstart/p3o.yaml", 2),
    "P3O-V1": ("configs/quickstart/p3o_v1.yaml", 2),
    "PPO": ("configs/quickstart/ppo.yaml", 1),
    "GRPO": ("configs/quickstart/grpo.yaml", 4),
    "RLOO": ("configs/quickstart/rloo.yaml", 2),
    "OnlineDPO": ("configs/quickstart/dpo.yaml", 2),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="P3O-V2 and PPO, scales 0 and 16, 1 seed, 4 rollouts")
    parser.add_argument("--objectives", nargs="*", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    parser.add_argument("--scales", type=float, nargs="*", default=[0.0, 1.0, 4.0, 16.0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--rollouts", type=int, default=24)
    parser.add_argument("--responses-per-rollout", type=int, default=64)
    parser.add_argument("--minibatch-responses", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--exports", type=Path, default=DEFAULT_EXPORTS, help="directory with sft/ and reward/")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/invariance")
    args = parser.parse_args()
    quick_scratch(parser, args, "out")
    sys.argv = sys.argv[:1]  # LightningCLI reads its own arguments from run_one's list
    if args.quick:
        args.objectives, args.scales, args.seeds = ["P3O-V2", "PPO"], [0.0, 16.0], [0]
        args.rollouts, args.eval_every, args.eval_prompts, args.responses_per_rollout = 4, 2, 16, 16
        args.minibatch_responses = 8
    os.chdir(ROOT)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    (args.out / "configs").mkdir(parents=True, exist_ok=True)
    ensure_exports(args.exports, "invariance")
    rows, points, start = [], [], time.time()
    for name in args.objectives:
        config, k = OBJECTIVES[name]
        for seed in args.seeds:
            base = None
            for scale in sorted(args.scales):
                t0 = time.time()
                reward = {"class_path": "modules.rewards.PromptShift",
                          "init_args": {"reward": {"class_path": "modules.rewards.RewardModel",
                                                   "init_args": {"path": str(args.exports / "reward"),
                                                                 "normalize": True}},
                                        "scale": scale, "seed": 1234, "reward_std": 1.0}}
                run = run_one(config, f"{name}-shift{scale:g}-s{seed}", seed, args.out, rollouts=args.rollouts,
                              responses_per_rollout=args.responses_per_rollout,
                              minibatch_responses=args.minibatch_responses, k=k, eval_every=args.eval_every,
                              eval_prompts=args.eval_prompts, exports=args.exports, model={"reward": reward})
                base = run if base is None else base          # the smallest scale (0) of this objective and seed
                end = run["points"][-1]
                same = [a == b for a, b in zip(run["responses"], base["responses"])] + [False]
                rows.append({"objective": name, "scale": scale, "seed": seed, "gold": end["gold"], "kl": end["kl"],
                             "gold_kl2": frontier_at(run["points"], 2.0), "gold_kl4": frontier_at(run["points"], 4.0),
                             "dw_first": (run["weights_after_first"] - base["weights_after_first"]).abs().max().item(),
                             "same_rollouts": same.index(False),
                             "max_dw": (run["weights"] - base["weights"]).abs().max().item()})
                points += [{"objective": name, "scale": scale, "seed": seed, **p} for p in run["points"]]
                r = rows[-1]
                print(f"[invariance] {name} scale={scale:g} seed={seed}: gold={end['gold']:.3f} kl={end['kl']:.2f} "
                      f"vs scale 0: max|dw| after rollout 1 {r['dw_first']:.1e}, identical rollouts "
                      f"{r['same_rollouts']}/{len(run['responses'])}, max|dw| at the end {r['max_dw']:.1e} "
                      f"({time.time() - t0:.0f}s, total {time.time() - start:.0f}s)", flush=True)
                write_outputs(rows, points, args.out)
    print(f"[invariance] wrote {args.out}/table.md, points.csv, invariance.png in {time.time() - start:.0f}s")


def write_outputs(rows: list[dict], points: list[dict], out: Path) -> None:
    write_points(points, out)
    lines = ["| objective | shift (reward std) | gold at end | KL at end | gold @ KL<=2 | gold @ KL<=4 "
             "| vs shift 0: max abs weight diff after rollout 1 | rollouts sampled identically | max abs weight diff "
             "at the end |", "|---" * 9 + "|"]
    fmt = lambda vals: "n/a" if not vals else (f"{vals[0]:.3f}" if len(vals) == 1 else  # noqa: E731
                                               f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}")
    for name in dict.fromkeys(r["objective"] for r in rows):
        for scale in sorted({r["scale"] for r in rows if r["objective"] == name}):
            mine = [r for r in rows if r["objective"] == name and r["scale"] == scale]
            cells = [fmt([r[key] for r in mine if r[key] is not None]) for key in ("gold", "kl", "gold_kl2", "gold_kl4")]
            same = "/".join(str(r["same_rollouts"]) for r in mine)
            lines.append(f"| {name} | {scale:g} | " + " | ".join(cells) + f" | {max(r['dw_first'] for r in mine):.1e} "
                         f"| {same} | {max(r['max_dw'] for r in mine):.1e} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    plot(points, out / "invariance.png")


def plot(points: list[dict], path: Path) -> None:
    names = list(dict.fromkeys(p["objective"] for p in points))

    def draw(ax, name):
        mine = [p for p in points if p["objective"] == name]
        first_seed = min(p["seed"] for p in mine)
        for scale in sorted({p["scale"] for p in mine}):
            run = [p for p in mine if p["scale"] == scale and p["seed"] == first_seed]
            ax.plot([p["kl"] for p in run], [p["gold"] for p in run], "o-", ms=3, label=f"shift {scale:g} std")
        ax.set_ylabel("gold reward")

    panel_figure(names, draw, "Per-prompt reward shift: gold reward vs KL during training (first seed)", path)


if __name__ == "__main__":
    main()
    from modules.process import exit_process

    exit_process(0)        # no finalization: seconds saved, and gloo can abort there (see there)

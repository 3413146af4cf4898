"""Learning to use a tool: P3O, GRPO-4 and RLOO on an embedded task with a tool (docs/tools.md), `--task`:

- calculator (`datamodules.sums.CalculatorSumTask`): sums of two numbers up to 30, with an `add` tool the policy may
  call. The SFT policy calls it on about half the prompts (as half its demonstrations do) and answers the rest from
  memory, mostly wrong; the reward is 1 where the final answer is the sum (`datamodules.sums.final_answer`). Does RL
  learn to call the tool, and to copy its result into the answer?
- register (`datamodules.sums.RegisterSumTask`): the same sums with a tools environment, a `Register` per response
  whose `add(n)` adds to a running total; the reward is the environment's own, 1 where the register holds the sum
  when the response ends (`modules.rewards.environment_reward`). The SFT policy adds both numbers on about half the
  prompts. Does RL learn to make both calls, in one response, on its own register?

    python benchmarks/tools.py                    # calculator: 3 arms x 3 seeds, 60 rollouts each (~9 min on 2 cores)
    python benchmarks/tools.py --task register    # register: the same (~10 min)
    python benchmarks/tools.py --quick            # every arm, 1 seed, 3 rollouts (CI-sized)

Every run starts from one SFT export of the task's configs/quickstart/<tools|environment>_sft.yaml and runs its
<tools|environment>_p3o.yaml with only the objective swapped: 64 responses per rollout (32 prompts x 2, or 16 x 4 for
GRPO-4), minibatches of 16 responses, the config's learning rate (3e-4 calculator, 1e-4 register), KL coefficient
0.05, and the same evaluation every 10 rollouts on the same 200 held-out prompts, sampled at temperature 1, through
the same tool loop. Reported: the evaluation's reward (`val/gold_reward`: accuracy, or registers holding the sum)
and its tool calls per answer (`val/tool_calls`).
Writes, under --out: points.csv, table.md, tools.png.
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

from runs import ROOT, build_sft, learning_arguments, read_points, run_one, settle, write_points  # noqa: E402
from stats import bootstrap_ci, fmt_ci  # noqa: E402

# task -> its configs (RL, SFT), its exports and results under the repository, its reward, and what that measures
TASKS = {
    "calculator": ("configs/quickstart/tools_p3o.yaml", "configs/quickstart/tools_sft.yaml", "artifacts/tools",
                   "benchmarks/results/tools", "datamodules.sums.final_answer", "accuracy"),
    "register": ("configs/quickstart/environment_p3o.yaml", "configs/quickstart/environment_sft.yaml",
                 "artifacts/environment", "benchmarks/results/tools/register", "modules.rewards.environment_reward",
                 "register holds the sum"),
}
ARMS = {
    "P3O": (2, {"class_path": "modules.objectives.p3o.P3O",
                "init_args": {"variant": "v2", "clip_eps": 0.2, "kl_coef": 0.05, "is_cap": 10.0}}),
    "GRPO-4": (4, {"class_path": "modules.objectives.grpo.GRPO", "init_args": {"k": 4, "kl_coef": 0.05, "clip_eps": 0.2}}),
    "RLOO": (2, {"class_path": "modules.objectives.rloo.RLOO", "init_args": {"k": 2, "kl_coef": 0.05, "clip_eps": 0.2}}),
}


def main() -> None:
    task = argparse.ArgumentParser(add_help=False)
    task.add_argument("--task", choices=sorted(TASKS), default="calculator", help="the embedded task (default: "
                      "calculator; register: a tools environment)")
    config, sft_config, exports, out, reward, measure = TASKS[task.parse_known_args()[0].task]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[task])
    learning_arguments(parser, quick_help="every arm, 1 seed, 3 rollouts", seeds=[0, 1, 2], rollouts=60,
                       exports=ROOT / exports, out=ROOT / out)
    args = parser.parse_args()
    if args.report_only:
        return write_report(read_points(args.out / "points.csv"), args.out, measure)
    sys.argv = sys.argv[:1]  # LightningCLI reads its own arguments from run_one's list
    settle(parser, args, [0, 1, 2])
    os.chdir(ROOT)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    (args.out / "configs").mkdir(parents=True, exist_ok=True)
    build_sft(args.exports, sft_config, args.quick, "tools")
    start, rows = time.time(), []
    for name, (k, objective) in ARMS.items():
        for seed in args.seeds:
            t0 = time.time()
            run = run_one(config, f"{name}-s{seed}", seed, args.out, rollouts=args.rollouts,
                          responses_per_rollout=args.responses_per_rollout, minibatch_responses=args.minibatch_responses,
                          k=k, eval_every=args.eval_every, eval_prompts=args.eval_prompts, exports=args.exports,
                          model={"reward": reward, "objective": objective})
            seconds = time.time() - t0
            rows.extend({"objective": name, "seed": seed, "run_s": seconds, **p} for p in run["points"])
            first, end = run["points"][0], run["points"][-1]
            print(f"[tools] {name} seed={seed}: {measure} {first['gold']:.3f} -> {end['gold']:.3f}, calls per "
                  f"answer {first['tool_calls']:.2f} -> {end['tool_calls']:.2f}, kl={end['kl']:.2f} ({seconds:.0f}s, "
                  f"total {time.time() - start:.0f}s)", flush=True)
        write_points(rows, args.out)
    write_report(read_points(args.out / "points.csv"), args.out, measure)
    print(f"[tools] wrote {args.out}/table.md, points.csv, tools.png in {time.time() - start:.0f}s")


def summary(rows: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Per arm, over its seeds: accuracy and calls per answer at the first and the last evaluation, the final KL.

    Example: P3O seeds 0 and 1 evaluated at 0 and 10 with (gold, tool_calls, kl) (0.4, 0.5, 0) -> (0.9, 1.0, 1.2)
    and (0.5, 0.4, 0) -> (0.8, 0.9, 1.4): start [0.4, 0.5], end [0.9, 0.8], calls_start [0.5, 0.4],
    calls_end [1.0, 0.9], kl [1.2, 1.4]."""
    out = {}
    for name in dict.fromkeys(r["objective"] for r in rows):
        seeds = sorted({r["seed"] for r in rows if r["objective"] == name})
        runs = [sorted((r for r in rows if r["objective"] == name and r["seed"] == s), key=lambda r: r["rollout"])
                for s in seeds]
        out[name] = {"start": [run[0]["gold"] for run in runs], "end": [run[-1]["gold"] for run in runs],
                     "calls_start": [run[0]["tool_calls"] for run in runs],
                     "calls_end": [run[-1]["tool_calls"] for run in runs], "kl": [run[-1]["kl"] for run in runs],
                     "rollouts": [run[-1]["rollout"] for run in runs]}
    return out


def write_report(rows: list[dict], out: Path, measure: str = "accuracy") -> None:
    """table.md: per arm, the mean over seeds (95% bootstrap interval) of the evaluation's reward (`measure`) and
    tool calls per answer (per response) at the start and the end, and the final KL."""
    lines = [f"| objective | seeds | rollouts | {measure} at start | at the end | calls per answer at start | at the "
             "end | KL at the end |", "|---|---|---|---|---|---|---|---|"]
    for name, arm in summary(rows).items():
        ci = lambda values: fmt_ci(bootstrap_ci(values)) if len(values) > 1 else f"{values[0]:.3f}"  # noqa: E731
        lines.append(f"| {name} | {len(arm['end'])} | {arm['rollouts'][0]} | {statistics.fmean(arm['start']):.3f} | "
                     f"{ci(arm['end'])} | {statistics.fmean(arm['calls_start']):.2f} | {ci(arm['calls_end'])} | "
                     f"{statistics.fmean(arm['kl']):.2f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    figure(rows, out / "tools.png", measure)


def figure(rows: list[dict], path: Path, measure: str) -> None:
    """The evaluation's reward (`measure`) and calls per answer against rollouts, each arm's mean over its seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for name in dict.fromkeys(r["objective"] for r in rows):
        steps = sorted({r["rollout"] for r in rows if r["objective"] == name})
        for ax, key in zip(axes, ("gold", "tool_calls")):
            ax.plot(steps, [statistics.fmean(r[key] for r in rows if r["objective"] == name and r["rollout"] == step)
                            for step in steps], marker="o", label=name)
    for ax, label in zip(axes, (f"{measure} (held-out, temperature 1)", "tool calls per answer")):
        ax.set_xlabel("rollouts")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Learning to use a tool: {measure} (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

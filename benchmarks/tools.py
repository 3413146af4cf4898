"""Learning to use a tool, or a user: P3O, GRPO-4 and RLOO (and P3O-4 on the guessing game) on an embedded multi-turn
task (docs/tools.md), `--task`:

- calculator (`datamodules.sums.CalculatorSumTask`): sums of two numbers up to 30, with an `add` tool the policy may
  call. The SFT policy calls it on about half the prompts (as half its demonstrations do) and answers the rest from
  memory, mostly wrong; the reward is 1 where the final answer is the sum (`datamodules.sums.final_answer`). Does RL
  learn to call the tool, and to copy its result into the answer?
- register (`datamodules.sums.RegisterSumTask`): the same sums with a tools environment, a `Register` per response
  whose `add(n)` adds to a running total; the reward is the environment's own, 1 where the register holds the sum
  when the response ends (`modules.rewards.environment_reward`). The SFT policy adds both numbers on about half the
  prompts. Does RL learn to make both calls, in one response, on its own register?
- guess (`datamodules.guess.GuessTask`): no tool, a simulated user (`datamodules.guess.Hints`, an environment's
  `respond`) holding a secret from 0 to 8, who answers each guess with "higher" or "lower" for up to 4 hints; the
  reward is 1 where the last guess is the secret (`datamodules.guess.guessed`). The SFT policy's demonstrations
  step one away after a hint, either way at random, so it guesses at random and ignores what the hints say. Does
  RL learn what they mean (`val/followed`: of the guesses after a hint, the share that went its way)?

    python benchmarks/tools.py                    # calculator: 3 arms x 3 seeds, 60 rollouts each (~9 min on 2 cores)
    python benchmarks/tools.py --task register    # register: the same (~10 min)
    python benchmarks/tools.py --task guess --rollouts 80   # guessing game: 4 arms (P3O-4 too) x 3 seeds (~16 min)
    python benchmarks/tools.py --quick            # every arm, 1 seed, 3 rollouts (CI-sized)

Every run starts from one SFT export of the task's configs/quickstart/<tools|environment|guess>_sft.yaml and runs
its <tools|environment|guess>_p3o.yaml with only the objective swapped: 64 responses per rollout (32 prompts x 2, or
16 x 4 for GRPO-4 and P3O-4), minibatches of 16 responses, the config's learning rate (3e-4 calculator and guess, 1e-4
register), KL coefficient 0.05, and the same evaluation every 10 rollouts on the same 200 held-out prompts, sampled
at temperature 1, through the same loop of turns. Reported: the evaluation's reward (`val/gold_reward`: accuracy,
registers holding the sum, secrets guessed) and its tool calls per answer (`val/tool_calls`), or for the guessing
game the share of hints followed (`val/followed`).
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
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runs import ROOT, build_sft, learning_arguments, read_points, run_one, settle, write_points  # noqa: E402
from stats import bootstrap_ci, fmt_ci  # noqa: E402


class Task(NamedTuple):
    """An embedded task: its configs (RL, SFT), its exports and results under the repository, its reward, what that
    measures, the second measure (the evaluation metric, its column's name), and its arms."""
    config: str
    sft_config: str
    exports: str
    out: str
    reward: str
    measure: str
    second: str = "tool_calls"
    label: str = "calls per answer"
    arms: tuple[str, ...] = ("P3O", "GRPO-4", "RLOO")


TASKS = {
    "calculator": Task("configs/quickstart/tools_p3o.yaml", "configs/quickstart/tools_sft.yaml", "artifacts/tools",
                       "benchmarks/results/tools", "datamodules.sums.final_answer", "accuracy"),
    "register": Task("configs/quickstart/environment_p3o.yaml", "configs/quickstart/environment_sft.yaml",
                     "artifacts/environment", "benchmarks/results/tools/register", "modules.rewards.environment_reward",
                     "register holds the sum"),
    "guess": Task("configs/quickstart/guess_p3o.yaml", "configs/quickstart/guess_sft.yaml", "artifacts/guess",
                  "benchmarks/results/tools/guess", "datamodules.guess.guessed", "secret guessed", "followed",
                  "hints followed", ("P3O", "P3O-4", "GRPO-4", "RLOO")),
}
ARMS = {
    "P3O": (2, {"class_path": "modules.objectives.p3o.P3O",
                "init_args": {"variant": "v2", "clip_eps": 0.2, "kl_coef": 0.05, "is_cap": 10.0}}),
    "P3O-4": (4, {"class_path": "modules.objectives.p3o.P3O",
                  "init_args": {"variant": "v2", "clip_eps": 0.2, "kl_coef": 0.05, "is_cap": 10.0, "k": 4}}),
    "GRPO-4": (4, {"class_path": "modules.objectives.grpo.GRPO", "init_args": {"k": 4, "kl_coef": 0.05, "clip_eps": 0.2}}),
    "RLOO": (2, {"class_path": "modules.objectives.rloo.RLOO", "init_args": {"k": 2, "kl_coef": 0.05, "clip_eps": 0.2}}),
}


def main() -> None:
    task = argparse.ArgumentParser(add_help=False)
    task.add_argument("--task", choices=sorted(TASKS), default="calculator", help="the embedded task (default: "
                      "calculator; register: a tools environment; guess: a simulated user)")
    config, sft_config, exports, out, reward, measure, second, label, arms = TASKS[task.parse_known_args()[0].task]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[task])
    learning_arguments(parser, quick_help="every arm, 1 seed, 3 rollouts", seeds=[0, 1, 2], rollouts=60,
                       exports=ROOT / exports, out=ROOT / out)
    args = parser.parse_args()
    if args.report_only:
        return write_report(read_points(args.out / "points.csv"), args.out, measure, second, label)
    sys.argv = sys.argv[:1]  # LightningCLI reads its own arguments from run_one's list
    settle(parser, args, [0, 1, 2])
    os.chdir(ROOT)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    (args.out / "configs").mkdir(parents=True, exist_ok=True)
    build_sft(args.exports, sft_config, args.quick, "tools")
    start, rows = time.time(), []
    for name in arms:
        k, objective = ARMS[name]
        for seed in args.seeds:
            t0 = time.time()
            run = run_one(config, f"{name}-s{seed}", seed, args.out, rollouts=args.rollouts,
                          responses_per_rollout=args.responses_per_rollout, minibatch_responses=args.minibatch_responses,
                          k=k, eval_every=args.eval_every, eval_prompts=args.eval_prompts, exports=args.exports,
                          model={"reward": reward, "objective": objective},
                          metrics=() if second == "tool_calls" else ("user_turns", second))
            seconds = time.time() - t0
            rows.extend({"objective": name, "seed": seed, "run_s": seconds, **p} for p in run["points"])
            first, end = run["points"][0], run["points"][-1]
            print(f"[tools] {name} seed={seed}: {measure} {first['gold']:.3f} -> {end['gold']:.3f}, {label} "
                  f"{first[second]:.2f} -> {end[second]:.2f}, kl={end['kl']:.2f} ({seconds:.0f}s, "
                  f"total {time.time() - start:.0f}s)", flush=True)
        write_points(rows, args.out)
    write_report(read_points(args.out / "points.csv"), args.out, measure, second, label)
    print(f"[tools] wrote {args.out}/table.md, points.csv, tools.png in {time.time() - start:.0f}s")


def summary(rows: list[dict], second: str = "tool_calls") -> dict[str, dict[str, list[float]]]:
    """Per arm, over its seeds: accuracy and the `second` measure (calls per answer) at the first and the last
    evaluation, the final KL.

    Example: P3O seeds 0 and 1 evaluated at 0 and 10 with (gold, tool_calls, kl) (0.4, 0.5, 0) -> (0.9, 1.0, 1.2)
    and (0.5, 0.4, 0) -> (0.8, 0.9, 1.4): start [0.4, 0.5], end [0.9, 0.8], calls_start [0.5, 0.4],
    calls_end [1.0, 0.9], kl [1.2, 1.4]."""
    out = {}
    for name in dict.fromkeys(r["objective"] for r in rows):
        seeds = sorted({r["seed"] for r in rows if r["objective"] == name})
        runs = [sorted((r for r in rows if r["objective"] == name and r["seed"] == s), key=lambda r: r["rollout"])
                for s in seeds]
        out[name] = {"start": [run[0]["gold"] for run in runs], "end": [run[-1]["gold"] for run in runs],
                     "calls_start": [run[0][second] for run in runs],
                     "calls_end": [run[-1][second] for run in runs], "kl": [run[-1]["kl"] for run in runs],
                     "rollouts": [run[-1]["rollout"] for run in runs]}
    return out


def write_report(rows: list[dict], out: Path, measure: str = "accuracy", second: str = "tool_calls",
                 label: str = "calls per answer") -> None:
    """table.md: per arm, the mean over seeds (95% bootstrap interval) of the evaluation's reward (`measure`) and
    of the `second` measure (`label`: tool calls per answer, hints followed) at the start and the end, and the
    final KL."""
    lines = [f"| objective | seeds | rollouts | {measure} at start | at the end | {label} at start | at the "
             "end | KL at the end |", "|---|---|---|---|---|---|---|---|"]
    for name, arm in summary(rows, second).items():
        ci = lambda values: fmt_ci(bootstrap_ci(values)) if len(values) > 1 else f"{values[0]:.3f}"  # noqa: E731
        lines.append(f"| {name} | {len(arm['end'])} | {arm['rollouts'][0]} | {statistics.fmean(arm['start']):.3f} | "
                     f"{ci(arm['end'])} | {statistics.fmean(arm['calls_start']):.2f} | {ci(arm['calls_end'])} | "
                     f"{statistics.fmean(arm['kl']):.2f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    figure(rows, out / "tools.png", measure, second, label)


def figure(rows: list[dict], path: Path, measure: str, second: str = "tool_calls", label: str = "calls per answer") -> None:
    """The evaluation's reward (`measure`) and the `second` measure against rollouts, each arm's mean over its seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for name in dict.fromkeys(r["objective"] for r in rows):
        steps = sorted({r["rollout"] for r in rows if r["objective"] == name})
        for ax, key in zip(axes, ("gold", second)):
            ax.plot(steps, [statistics.fmean(r[key] for r in rows if r["objective"] == name and r["rollout"] == step)
                            for step in steps], marker="o", label=name)
    for ax, ylabel in zip(axes, (f"{measure} (held-out, temperature 1)", label)):
        ax.set_xlabel("rollouts")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Learning a multi-turn task: {measure} (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

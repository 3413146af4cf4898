"""Learning from a verifiable reward: P3O, RLOO and GRPO (and two P3O variants) on the embedded sum task, whose
reward is 1 where the response's number is the record's answer, else 0 (`modules.verifiable.AnswerMatch`); thirteen
ablation arms asking why P3O rises more slowly than GRPO-4 there, each changing one thing; three of TRL 1.16's GRPO
variants (its unbiased KL gradient, CISPO, SAPO); three with DAPO's dynamic sampling (`keep_groups`); and four on a
composed reward, correct + 0.25 x an uncalibrated judge, asking whether normalising each term (GDPO, P3O's
`normalize_terms`) keeps the weights' meaning where the sum does not (`REWARDS`).

    python benchmarks/verifiable.py            # 28 arms x 5 seeds, 80 rollouts each (~47 min on 2 cores)
    python benchmarks/verifiable.py --arms 'P3O kl 0'   # some arms; the others' rows in points.csv are kept
    python benchmarks/verifiable.py --arms GRPO-4 'GRPO-4 + judge' 'GDPO-4 + judge' P3O 'P3O + judge' \
        'P3O normalize_terms + judge' --out benchmarks/results/verifiable/gdpo   # the composed reward
    python benchmarks/verifiable.py --quick    # every arm, 1 seed, 3 rollouts (CI-sized)

Every run starts from one SFT export of configs/quickstart/sums_sft.yaml (demonstrations right half of the time)
and runs configs/quickstart/sums_p3o.yaml with only the objective swapped: the same responses per rollout (64:
32 prompts x 2, or 16 x 4 for the K = 4 arms), minibatches of 16 responses, learning rate (but `LR`'s arm), KL
coefficient (but where an arm's name says otherwise), and the same evaluation every 10 rollouts on the same 200
held-out prompts, sampled at temperature 1. The accuracy reported is that evaluation's `val/gold_reward`: the share
of right sums.
Writes, under --out: points.csv, table.md, accuracy.png.
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
from stats import bootstrap_ci, fmt_ci, paired_ci  # noqa: E402

CONFIG, SFT_CONFIG = "configs/quickstart/sums_p3o.yaml", "configs/quickstart/sums_sft.yaml"
REWARD = {"class_path": "modules.verifiable.AnswerMatch", "init_args": {"field": "answer"}}
# name -> (K responses per prompt, objective)
ARMS = {
    "P3O": (2, {"class_path": "modules.objectives.p3o.P3O",
                "init_args": {"variant": "v2", "clip_eps": 0.2, "kl_coef": 0.05, "is_cap": 10.0}}),
    "RLOO": (2, {"class_path": "modules.objectives.rloo.RLOO", "init_args": {"k": 2, "kl_coef": 0.05, "clip_eps": 0.2}}),
    "GRPO-4": (4, {"class_path": "modules.objectives.grpo.GRPO", "init_args": {"k": 4, "kl_coef": 0.05, "clip_eps": 0.2}}),
    "P3O-4": (4, {"class_path": "modules.objectives.p3o.P3O",
                  "init_args": {"variant": "v2", "k": 4, "clip_eps": 0.2, "kl_coef": 0.05, "is_cap": 10.0}}),
    "P3O scale_q": (2, {"class_path": "modules.objectives.p3o.P3O",          # rewards / their running std
                        "init_args": {"variant": "v2", "clip_eps": 0.2, "kl_coef": 0.05, "is_cap": 10.0,
                                      "scale_q": True}}),
    # how tight P3O's trust region is: V2 clips the pair's L = logp1 - logp2 within eps of L_old, which both
    # responses' moves add up in; V1 clips each response's own ratio, as RLOO does
    "P3O-V1": (2, {"class_path": "modules.objectives.p3o.P3O",
                   "init_args": {"variant": "v1", "clip_eps": 0.2, "kl_coef": 0.05, "is_cap": 10.0}}),
    "P3O clip 0.4": (2, {"class_path": "modules.objectives.p3o.P3O",
                         "init_args": {"variant": "v2", "clip_eps": 0.4, "kl_coef": 0.05, "is_cap": 10.0}}),
    # GRPO-4 without dividing by each group's std: is that what makes it rise fastest?
    "GRPO-4 unscaled": (4, {"class_path": "modules.objectives.grpo.GRPO",
                            "init_args": {"k": 4, "kl_coef": 0.05, "clip_eps": 0.2, "scale_rewards": "none"}}),
}
# arms whose learning rate is not the config's 3e-4: GRPO's loss (a mean over each response's tokens, advantages
# r - group mean) steps about 3/8 as far as P3O's per unit of learning rate on these 2-token answers
LR = {"P3O lr 1e-4": 1e-4}
ARMS["P3O lr 1e-4"] = ARMS["P3O"]
# GRPO-4 with one length-normalised ratio per response, clipped as P3O clips whole sequences (GSPO's ratio, at
# GRPO's clip range)
ARMS["GRPO-4 sequence ratio"] = (4, {"class_path": "modules.objectives.grpo.GRPO",
                                     "init_args": {"k": 4, "kl_coef": 0.05, "clip_eps": 0.2,
                                                   "importance_sampling_level": "sequence"}})
# GRPO-4 with its KL where P3O has it: in the reward (r - beta * the rollout's sequence KL), none in the loss
ARMS["GRPO-4 KL in reward"] = (4, {"class_path": "modules.objectives.grpo.GRPO",
                                   "init_args": {"k": 4, "kl_coef": 0.05, "clip_eps": 0.2, "kl_in_reward": True}})
# ... and without the group std, which scales a tied group's KL differences (its whole reward signal) to unit size
ARMS["GRPO-4 KL in reward unscaled"] = (4, {"class_path": "modules.objectives.grpo.GRPO",
                                            "init_args": {"k": 4, "kl_coef": 0.05, "clip_eps": 0.2, "kl_in_reward": True,
                                                          "scale_rewards": "none"}})
# P3O with its KL where GRPO has it: a sequence k3 penalty in the loss, none in the reward difference
ARMS["P3O KL in loss"] = (2, {"class_path": "modules.objectives.p3o.P3O",
                              "init_args": {"variant": "v2", "clip_eps": 0.2, "kl_coef": 0.05, "is_cap": 10.0,
                                            "kl_in_loss": True}})
# ... at half the beta: GRPO's penalty is a mean over each response's ~2 tokens, this one their sum
ARMS["P3O KL in loss, beta 0.025"] = (2, {"class_path": "modules.objectives.p3o.P3O",
                                          "init_args": {"variant": "v2", "clip_eps": 0.2, "kl_coef": 0.025,
                                                        "is_cap": 10.0, "kl_in_loss": True}})
# P3O without the KL term in its reward difference (GRPO puts its KL in the loss, as a separate k3 penalty)
ARMS["P3O kl 0"] = (2, {"class_path": "modules.objectives.p3o.P3O",
                        "init_args": {"variant": "v2", "clip_eps": 0.2, "kl_coef": 0.0, "is_cap": 10.0}})
# What remains between P3O-V1 and RLOO at K = 2 (at ratio 1 and without KL the same gradient): P3O's KL shaping from
# the current policy, recomputed every minibatch (RLOO's is the rollout's), and its partner's importance weight
ARMS["RLOO KL on current policy"] = (2, {"class_path": "modules.objectives.rloo.RLOO",
                                         "init_args": {"k": 2, "kl_coef": 0.05, "clip_eps": 0.2,
                                                       "kl_on_current_policy": True}})
ARMS["P3O-V1 no partner weight"] = (2, {"class_path": "modules.objectives.p3o.P3O",       # c_j = clamp(rho_j, 1, 1)
                                        "init_args": {"variant": "v1", "clip_eps": 0.2, "kl_coef": 0.05,
                                                      "is_cap": 1.0}})
# ... and P3O-V2 without its joint importance weight sg[clamp(rho1 rho2, 1/R, R)] (R = 1: the weight is 1)
ARMS["P3O no IS weight"] = (2, {"class_path": "modules.objectives.p3o.P3O",
                                "init_args": {"variant": "v2", "clip_eps": 0.2, "kl_coef": 0.05, "is_cap": 1.0}})
# GRPO-4 with TRL 1.16's default KL gradient (the k3 term times the ratio: unbiased), and with two of its other
# per-token terms in place of the clip: CISPO (the weight clipped, never the token) and SAPO (a soft gate)
ARMS["GRPO-4 unbiased KL"] = (4, {"class_path": "modules.objectives.grpo.GRPO",
                                  "init_args": {"k": 4, "kl_coef": 0.05, "clip_eps": 0.2, "kl_bias_correction": True}})
ARMS["GRPO-4 CISPO"] = (4, {"class_path": "modules.objectives.grpo.GRPO",
                            "init_args": {"k": 4, "kl_coef": 0.05, "loss_type": "cispo"}})
ARMS["GRPO-4 SAPO"] = (4, {"class_path": "modules.objectives.grpo.GRPO",
                           "init_args": {"k": 4, "kl_coef": 0.05, "loss_type": "sapo"}})
# DAPO's dynamic sampling (`keep_groups`): each rollout samples `OVERSAMPLE` times the prompts and trains on as many
# as the arm it copies, those whose rewards do not all tie first (the sum task holds as many more records)
OVERSAMPLE = {"GRPO-4 dynamic sampling": 2, "P3O-4 dynamic sampling": 2, "P3O dynamic sampling": 3}
ARMS.update({name: ARMS[name.removesuffix(" dynamic sampling")] for name in OVERSAMPLE})
# A composed reward whose second term is on another scale: an uncalibrated judge (`UncalibratedJudge`, std 3,
# unrelated to correctness) weighted 0.25, where the user means correctness to count 4x as much. Summed, the judge's
# spread (0.25 x 3 = 0.75) outweighs correctness's (at most 0.5); GDPO normalises each term within its group first,
# so the weights say how much each counts (`multi_objective_aggregation: normalize_then_sum`).
JUDGED = {"class_path": "modules.rewards.Composed", "init_args": {
    "rewards": {"correct": REWARD, "judge": {"class_path": "verifiable.UncalibratedJudge", "init_args": {"scale": 3.0}}},
    "weights": {"correct": 1.0, "judge": 0.25}}}
REWARDS = {"GRPO-4 + judge": JUDGED, "GDPO-4 + judge": JUDGED, "P3O + judge": JUDGED,
           "P3O normalize_terms + judge": JUDGED}
ARMS["GRPO-4 + judge"] = ARMS["GRPO-4"]
ARMS["GDPO-4 + judge"] = (4, {"class_path": "modules.objectives.grpo.GRPO",
                              "init_args": {"k": 4, "kl_coef": 0.05, "clip_eps": 0.2,
                                            "multi_objective_aggregation": "normalize_then_sum"}})
ARMS["P3O + judge"] = ARMS["P3O"]
ARMS["P3O normalize_terms + judge"] = (2, {"class_path": "modules.objectives.p3o.P3O",      # each term's differences
                                           "init_args": {"variant": "v2", "clip_eps": 0.2, "kl_coef": 0.05,  # over
                                                         "is_cap": 10.0, "normalize_terms": True}})  # their rms
BASELINE = "P3O"
# train/* metrics kept per evaluation window: mean since the last
TRAIN_METRICS = ("clipfrac", "tied_groups", "better_shift", "worse_shift", "sampled_tied_groups", "reward_judge")


class UncalibratedJudge:
    """The composed arms' second term: a stand-in for a reward model whose scale nobody calibrated, unrelated to
    the task. Each (prompt, response) gets a fixed score, `scale` x a standard normal drawn from a hash of both texts
    (the same response to the same prompt always scores the same, so a policy can learn to please it).

    Args:
        scale: the scores' std.
    """

    def __init__(self, scale: float = 3.0):
        self.scale = scale

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        import hashlib
        import random

        return [self.scale * random.Random(hashlib.sha256(f"{p}\0{r}".encode()).digest()).gauss(0.0, 1.0)
                for p, r in zip(prompts, responses)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    learning_arguments(parser, quick_help="every objective, 1 seed (or --seeds), 3 rollouts", seeds=[0, 1, 2, 3, 4],
                       rollouts=80, exports=ROOT / "artifacts/sums", out=ROOT / "benchmarks/results/verifiable")
    parser.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS),
                        help="the arms to run (default: all); the other arms' rows in --out's points.csv are kept")
    args = parser.parse_args()
    if args.report_only:
        return write_report(read_points(args.out / "points.csv"), args.out)
    sys.argv = sys.argv[:1]  # LightningCLI reads its own arguments from run_one's list
    settle(parser, args, [0, 1, 2, 3, 4])
    os.chdir(ROOT)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    (args.out / "configs").mkdir(parents=True, exist_ok=True)
    build_sft(args.exports, SFT_CONFIG, args.quick, "verifiable")
    start, rows = time.time(), kept_rows(args.out / "points.csv", args.arms)
    for name in args.arms:
        (k, objective), lr, oversample = ARMS[name], LR.get(name), OVERSAMPLE.get(name, 1)
        for seed in args.seeds:
            t0 = time.time()
            run = run_one(CONFIG, f"{name.replace(' ', '_')}-s{seed}", seed, args.out, rollouts=args.rollouts,
                          responses_per_rollout=args.responses_per_rollout, minibatch_responses=args.minibatch_responses,
                          k=k, eval_every=args.eval_every, eval_prompts=args.eval_prompts, exports=args.exports,
                          model={"reward": REWARDS.get(name, REWARD), "objective": objective}, lr=lr,
                          oversample=oversample,
                          data={"source": {"init_args": {"num_train": 3000 * oversample}}} if oversample > 1 else None)
            seconds = time.time() - t0
            per_rollout = {key: [m.get(f"train/{key}") for m in run["train"]] for key in TRAIN_METRICS}
            rows.extend({"objective": name, "seed": seed, "run_s": seconds, **p,
                         **{key: mean_since(values, previous["rollout"] if previous else None, p["rollout"])
                            for key, values in per_rollout.items()}}
                        for previous, p in zip([None, *run["points"]], run["points"]))
            end = run["points"][-1]
            print(f"[verifiable] {name} seed={seed}: accuracy {run['points'][0]['gold']:.3f} -> {end['gold']:.3f} "
                  f"kl={end['kl']:.2f} ({seconds:.0f}s, total {time.time() - start:.0f}s)", flush=True)
        write_points(sorted(rows, key=lambda r: list(ARMS).index(r["objective"])), args.out)   # (stable: in order)
    rows = read_points(args.out / "points.csv")
    write_report(rows, args.out)
    print(f"[verifiable] wrote {args.out}/table.md, points.csv, accuracy.png in {time.time() - start:.0f}s")


def kept_rows(path: Path, running: list[str]) -> list[dict]:
    """The rows of `path` (an earlier run's points.csv) of the arms not run now, so that running some arms adds to
    the table; none if there is no such file."""
    if not path.exists():
        return []
    kept = [{**dict.fromkeys(TRAIN_METRICS), **row} for row in read_points(path)    # (a metric added since: empty)
            if row["objective"] not in running and row["objective"] in ARMS]
    if kept:
        print(f"[verifiable] keeping {path}'s rows of {sorted({r['objective'] for r in kept})}")
    return kept


def mean_since(values: list[float | None], after: int | None, upto: int) -> float | None:
    """The mean of `values[r - 1]` for rollouts r in (after, upto] (a rollout's `train/clipfrac`, the mean over its
    updates, or `train/tied_groups`), or None where there are none (the evaluation before the first rollout)."""
    if after is None:
        return None
    window = [v for v in values[after:upto] if v is not None]
    return statistics.fmean(window) if window else None


def early_rollout(rows: list[dict]) -> int:
    """The evaluation that measures how fast an objective rises: the first at or after a quarter of the run (20 of
    80 rollouts)."""
    steps = sorted({r["rollout"] for r in rows})
    return next(s for s in steps if s >= steps[-1] / 4 and s > 0)


def summary(rows: list[dict]) -> dict[str, dict]:
    """Per objective, each {seed: value}: start, early (at `early_rollout`), end, best (accuracy), kl (at the end),
    each of `TRAIN_METRICS` (the mean over the run's rollouts), run_s (seconds)."""
    out, early, windows = {}, early_rollout(rows), {}
    for row in sorted(rows, key=lambda r: r["rollout"]):        # a run's last evaluation comes last
        arm = out.setdefault(row["objective"], {key: {} for key in ("start", "early", "end", "best", "kl",
                                                                     *TRAIN_METRICS, "run_s", "early_better_shift",
                                                                     "early_worse_shift")})
        seed = row["seed"]
        arm["start"].setdefault(seed, row["gold"])
        if row["rollout"] == early:
            arm["early"][seed] = row["gold"]
        arm["end"][seed], arm["kl"][seed] = row["gold"], row["kl"]
        arm["best"][seed] = max(arm["best"].get(seed, 0.0), row["gold"])
        for key in TRAIN_METRICS:        # (each window between evaluations holds as many rollouts)
            if row.get(key) is not None:
                windows.setdefault((row["objective"], seed, key), []).append(row[key])
                arm[key][seed] = statistics.fmean(windows[row["objective"], seed, key])
                if key.endswith("_shift") and row["rollout"] <= early:      # the first quarter: how fast it rises
                    arm[f"early_{key}"][seed] = arm[key][seed]
        arm["run_s"][seed] = row["run_s"]
    return out


def write_report(rows: list[dict], out: Path) -> None:
    arms = summary(rows)
    seeds = len(next(iter(arms.values()))["end"])
    lines = [f"Held-out accuracy (share of right sums, sampled at temperature 1), mean over {seeds} seeds with its "
             "95% bootstrap interval; `vs P3O`: the paired difference of the final accuracy (same seed: same prompt "
             "order and sampling stream); clipfrac: the share of clipped terms (pairs, responses or tokens, as the "
             "objective clips), mean over the run's updates and seeds; tied: the share of groups whose rewards all "
             "tie (`train/tied_groups`), mean over the run's rollouts and seeds (dynamic sampling: of the groups "
             "trained on, then of those sampled); better / worse: P3O's mean "
             "log(pi / pi_old) of each pair's better and worse response during the updates (`train/better_shift`, "
             "`train/worse_shift`), over the first quarter of the run.", "",
             f"| objective | accuracy at start | at rollout {early_rollout(rows)} | at the end | best during the run | "
             "KL at the end | end vs P3O | clipfrac | tied | better / worse | s / run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, arm in arms.items():
        versus = "-" if name == BASELINE or BASELINE not in arms else fmt_ci(paired_ci(arm["end"], arms[BASELINE]["end"]))
        clipfrac, tied = (f"{statistics.fmean(arm[key].values()):.3f}" if arm[key] else "-" for key in TRAIN_METRICS[:2])
        if arm["sampled_tied_groups"]:          # dynamic sampling: the kept rollout's, then the sampled one's
            tied += f" ({statistics.fmean(arm['sampled_tied_groups'].values()):.3f} sampled)"
        shifts = (f"{statistics.fmean(arm['early_better_shift'].values()):+.3f} / "
                  f"{statistics.fmean(arm['early_worse_shift'].values()):+.3f}" if arm["early_better_shift"] else "-")
        lines.append(f"| {name} | {statistics.fmean(arm['start'].values()):.3f} | "
                     f"{fmt_ci(bootstrap_ci(list(arm['early'].values())))} | "
                     f"{fmt_ci(bootstrap_ci(list(arm['end'].values())))} | "
                     f"{fmt_ci(bootstrap_ci(list(arm['best'].values())))} | "
                     f"{statistics.fmean(arm['kl'].values()):.2f} | {versus} | {clipfrac} | {tied} | {shifts} | "
                     f"{statistics.median(arm['run_s'].values()):.0f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    figure(rows, out / "accuracy.png")


MAIN = ("P3O", "RLOO", "GRPO-4", "P3O-4", "P3O scale_q")      # the objectives compared; the other arms ask why


def figure(rows: list[dict], path: Path) -> None:
    """Accuracy against rollouts: each seed faint, the mean over seeds bold, one colour per arm; the objectives in
    the first panel, the ablations (with P3O and GRPO-4 again, to compare) in three more: those of clipping, reward
    scale and step size, those of where the KL enters, and DAPO's dynamic sampling (with P3O-4 too)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["objective"] for r in rows))
    colours = {name: f"C{index % 10}" for index, name in enumerate(names)}
    styles = {name: "-" if index < 10 else "--" for index, name in enumerate(names)}     # (10 colours, then dashed)
    for name in set(OVERSAMPLE) & set(names):           # dynamic sampling: its arm's colour, dashed
        colours[name], styles[name] = colours.get(name.removesuffix(" dynamic sampling"), colours[name]), "--"
    kl = [n for n in names if "kl" in n.lower() and n not in MAIN]
    dynamic = [n for n in names if n in OVERSAMPLE]
    judged = [n for n in names if n in REWARDS]
    panels = [("objectives", [n for n in names if n in MAIN]),
              ("why slower? clipping, scale, step",
               [n for n in names if n not in MAIN + tuple(kl + dynamic + judged)]),
              ("why slower? where the KL enters", kl),
              ("dynamic sampling (2-3x the samples per rollout)", dynamic),
              ("correct + 0.25 x an uncalibrated judge (std 3)", judged)]
    compare = {title: [n for n in ("P3O", "P3O-4" if arms is dynamic else "", "GRPO-4") if n in names]
               for title, arms in panels}                           # drawn again beside each ablation
    panels = [(title, ([] if title == "objectives" else compare[title]) + arms) for title, arms in panels if arms]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), sharey=True, squeeze=False)
    for ax, (title, arms) in zip(axes[0], panels):
        for name in arms:
            mine = [r for r in rows if r["objective"] == name]
            for seed in sorted({r["seed"] for r in mine}):
                points = [r for r in mine if r["seed"] == seed]
                ax.plot([r["rollout"] for r in points], [r["gold"] for r in points], color=colours[name], alpha=0.2,
                        lw=0.8)
            steps = sorted({r["rollout"] for r in mine})
            ax.plot(steps, [statistics.fmean(r["gold"] for r in mine if r["rollout"] == s) for s in steps],
                    color=colours[name], ls=styles[name], lw=2, label=name)
        ax.set_xlabel("rollout")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("held-out accuracy")
    fig.suptitle("Verifiable reward on the sum task")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
    from modules.process import exit_process

    exit_process(0)        # no finalization: seconds saved

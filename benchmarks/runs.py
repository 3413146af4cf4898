"""Running one RL training from a stage-3 config for the benchmarks (frontier, invariance, smollm2).

Every run derives its config from a stage-3 YAML with only what the benchmark varies overridden, and returns
its evaluation points and final policy weights. `seed` seeds everything that is random in a run: the global
generator, the rollout sampler's stream, the prompt order and the minibatch shuffling.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_EXPORTS = ROOT / "artifacts/quickstart"
TEXT_COLUMNS, INT_COLUMNS = ("setting", "objective", "knob"), ("seed", "rollout", "samples")


class Trace(L.Callback):
    """Records what a benchmark compares between runs: the sampled responses of every rollout, the seconds its
    scoring took, each rollout's `train/*` metrics (the means over its updates, as logged), and the policy weights
    after the first rollout's updates (before any difference between two runs can compound)."""

    def __init__(self):
        self.responses: list[list[str]] = []
        self.score_s: list[float] = []
        self.train: list[dict[str, float]] = []
        self.weights_after_first: torch.Tensor | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.responses.append(list(pl_module.rollout.responses))   # OnPolicyRollout ran before (callback order)
        self.score_s.append(pl_module.rollout.timings["perf/score_s"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})
        if self.weights_after_first is None:
            self.weights_after_first = flat_weights(pl_module.policy)


def flat_weights(model) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten().cpu() for p in model.parameters()])


def ensure_exports(exports: Path, tag: str, family: str = "quickstart", stages: tuple = ("sft", "reward")) -> None:
    """Build the exports of `configs/<family>/<stage>.yaml` (SFT and reward by default) where they are missing (at
    their default location `artifacts/<family>` only)."""
    from train import cli_main

    for stage in stages:
        if not (exports / stage / "config.json").exists():
            if exports != ROOT / "artifacts" / family:
                raise SystemExit(f"error: {exports / stage} does not exist (--exports must hold {', '.join(stages)})")
            print(f"[{tag}] building the {family} {stage} export")
            cli_main(["fit", "--config", f"configs/{family}/{stage}.yaml", "--trainer.enable_progress_bar=false"])


def quick_scratch(parser, args, *names: str) -> None:
    """With --quick, each path argument in `names` still at its default (`parser`'s) moves to a scratch directory,
    said in one line: a CI-sized run must not overwrite the published results (points.csv, table, figure) under
    benchmarks/results, nor leave a one-epoch SFT export where the full run would reuse it."""
    import tempfile

    if not args.quick:
        return
    for name in names:
        default = parser.get_default(name)
        if getattr(args, name) == default:
            scratch = Path(tempfile.gettempdir()) / "p3o-rlhf-quick" / default.relative_to(ROOT)
            setattr(args, name, scratch)
            print(f"[quick] --{name} {scratch} (not the default {default.relative_to(ROOT)}: it holds the full run's)")


def learning_arguments(parser, *, quick_help: str, seeds: list[int], rollouts: int, exports: Path, out: Path) -> None:
    """The arguments of a benchmark of learning curves from one SFT export (`verifiable.py`, `tools.py`): --quick,
    --seeds, the budget of each run, --exports, --out, --report-only (`settle` applies --quick)."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--seeds", type=int, nargs="*", help=f"default: {seeds[0]}-{seeds[-1]} (--quick: 0)")
    parser.add_argument("--rollouts", type=int, default=rollouts)
    parser.add_argument("--responses-per-rollout", type=int, default=64)
    parser.add_argument("--minibatch-responses", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-prompts", type=int, default=200)
    parser.add_argument("--exports", type=Path, default=exports, help="directory with sft/ (built if missing)")
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--report-only", action="store_true", help="redo table.md and the figure from points.csv")


def settle(parser, args, seeds: list[int]) -> None:
    """--quick's budget (1 seed, 3 rollouts of 16 responses in minibatches of 8, 16 prompts evaluated after each;
    --exports and --out left at their defaults: scratch directories, `quick_scratch`) and the default seeds."""
    quick_scratch(parser, args, "out", "exports")
    if args.quick:
        args.seeds = args.seeds or [0]
        args.rollouts, args.responses_per_rollout, args.minibatch_responses = 3, 16, 8
        args.eval_every, args.eval_prompts = 1, 16
    args.seeds = args.seeds if args.seeds is not None else seeds


def build_sft(exports: Path, config: str, quick: bool, tag: str) -> None:
    """The SFT export of `config` at `exports`/sft unless it is there (--quick: one short epoch)."""
    from train import cli_main

    if (exports / "sft" / "config.json").exists():
        return
    print(f"[{tag}] building the SFT export of {config} at {exports / 'sft'}")
    short = ["--trainer.max_epochs=1", "--data.init_args.source.init_args.num_train=256"] if quick else []
    cli_main(["fit", "--config", config, f"--export_dir={exports / 'sft'}", "--trainer.enable_progress_bar=false",
              "--trainer.logger=false", *short])


def run_one(config: str, tag: str, seed: int, out: Path, *, rollouts: int, responses_per_rollout: int,
            minibatch_responses: int, k: int, eval_every: int, eval_prompts: int, exports: Path = DEFAULT_EXPORTS,
            model: dict | None = None, objective: dict | None = None, lr: float | None = None,
            oversample: int = 1, data: dict | None = None, metrics: tuple[str, ...] = (),
            trainer: dict | None = None) -> dict:
    """One run. Budget: `rollouts` rollouts of `responses_per_rollout` trained responses (prompts per rollout =
    responses / k), minibatches of `minibatch_responses` responses; evaluation every `eval_every` rollouts on the
    first `eval_prompts` held-out prompts. `model` / `objective` are merged into the model's / objective's
    init_args, `data` into the data's, `trainer` into the trainer's (e.g. precision). `oversample` > 1: each
    rollout samples that many times the prompts and trains on `responses_per_rollout` of the responses
    (`keep_groups`: DAPO's dynamic sampling); a point's "samples" counts the sampled ones; `metrics` names further
    `val/<name>` metrics each point keeps. Returns {"points": evaluation history, "weights": final policy
    parameters (flat, CPU), "weights_after_first": the same after the first rollout, "responses": each rollout's
    sampled responses, "score_s": each rollout's scoring seconds, "train": each rollout's `train/*` metrics}."""
    import yaml

    from train import cli_main, derive_config

    callbacks = yaml.safe_load(Path(config).read_text())["trainer"]["callbacks"]
    for cb in callbacks:
        if cb["class_path"].endswith("Evaluation"):
            cb["init_args"].update(every_n_batches=eval_every, num_prompts=eval_prompts, show=0)
        if cb["class_path"].endswith("OnPolicyRollout"):
            cb["init_args"] = {**cb.get("init_args", {}), "seed": seed}
    callbacks = [cb for cb in callbacks if not cb["class_path"].endswith(("HFExport", "StepCheckpoint"))]
    model_args = {"seed": seed, "minibatch_groups": max(1, minibatch_responses // k),
                  "policy": {"pretrained": str(exports / "sft")}, "objective": {"init_args": objective or {}},
                  **(model or {})}
    if "reward" not in (model or {}):
        model_args["reward"] = {"init_args": {"path": str(exports / "reward")}}
    if "ppo" in Path(config).stem:
        model_args["value_model"] = {"pretrained": str(exports / "reward")}
    if lr is not None:                  # (into the arm's own optimizer where it names one)
        given = model_args.get("optimizer", {})
        model_args["optimizer"] = {**given, "init_args": {**given.get("init_args", {}), "lr": lr}}
    if oversample > 1:
        model_args["keep_groups"] = responses_per_rollout // k
    derived = derive_config(config, {
        "seed_everything": seed,
        "trainer": {"max_steps": -1, "max_epochs": 1, "limit_train_batches": rollouts, "callbacks": callbacks,
                    "enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False,
                    "logger": {"init_args": {"save_dir": str(out / "runs"), "name": tag}}, **(trainer or {})},
        "model": {"init_args": model_args},
        "data": {"init_args": {"batch_size": oversample * responses_per_rollout // k, "seed": seed,
                               "tokenizer": str(exports / "sft"), **(data or {})}},
    }, out / "configs" / f"{tag}.yaml")
    trace = Trace()
    cli = cli_main(["--config", derived], run=False)
    cli.trainer.callbacks.append(trace)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    evaluation = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "Evaluation")
    sampled = responses_per_rollout * oversample
    points = [{"rollout": h["step"], "samples": h["step"] * sampled, "gold": h.get("val/gold_reward"),
               "proxy": h.get("val/reward"), "kl": h.get("val/kl"), "win_rate": h.get("val/win_rate"),
               "length": h.get("val/length"), "tool_calls": h.get("val/tool_calls"),
               **{name: h.get(f"val/{name}") for name in metrics}} for h in evaluation.history]
    return {"points": points, "weights": flat_weights(cli.model.policy),
            "weights_after_first": trace.weights_after_first, "responses": trace.responses, "score_s": trace.score_s,
            "train": trace.train}


def panel_figure(names: list[str], draw, title: str, path: Path, sharey: bool = False) -> None:
    """One panel per objective, 3 to a row: `draw(ax, name)` plots into it; each panel gets its title, the KL
    x-label, a grid and a legend; the figure is saved to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(names))
    n_rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.2 * cols, 3.4 * n_rows), squeeze=False, sharey=sharey)
    for ax, name in zip(axes.flat, names):
        draw(ax, name)
        ax.set_title(name)
        ax.set_xlabel("KL(policy || SFT)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_points(rows: list[dict], out: Path, name: str = "points.csv") -> None:
    """Every evaluation point of a benchmark (or any rows) to `out`/`name` (columns: the keys of the first row)."""
    with open(out / name, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def read_points(path: Path) -> list[dict]:
    """points.csv back into typed rows (numbers as numbers, empty cells as None): what `--report-only` reads."""
    def typed(key: str, value: str):
        if key in TEXT_COLUMNS:
            return value
        if value == "":
            return None
        return int(value) if key in INT_COLUMNS else float(value)

    with open(path, newline="") as handle:
        return [{k: typed(k, v) for k, v in row.items()} for row in csv.DictReader(handle)]

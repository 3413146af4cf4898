"""Seconds per RL rollout of a real run under each logprob layout, alternating processes, in one command.

    python benchmarks/layout.py                                    # SmolLM2 P3O (`make smollm2` builds its exports)
    python benchmarks/layout.py --config configs/quickstart/p3o.yaml --rollouts 8   # the quickstart (`make demo`)
    python benchmarks/layout.py --quick --exports DIR   # quickstart config, DIR/sft + DIR/reward, 3 rollouts, 1 run

The config's RL stage for `--rollouts` rollouts (the first one a warm-up; no evaluation, checkpoints or logger),
once per layout of `RLModule`'s logprob passes (pi_ref and the updates), each in its own process, alternating,
each pass over the whole rollout or minibatch and the policy without activation checkpointing
(`micro_batch_tokens: null`, `activation_checkpointing: false`: the layouts' own cost, as the page measured it):
  packed    the default: each prompt once per group, padding dropped (`layout.packed_prompt_layout`)
  padded    each prompt once per group, padding kept (`prompt_layout: padded`, `layout.shared_prompt_layout`; what
            models partitioned by DeepSpeed ZeRO-3 run)
  unshared  one row per response (`share_prompts: false`)
Random weights never stop early, real ones do: responses end at different lengths, and the padding after each
EOS is what `packed` drops. Printed: the share of padding in the padded layout, median seconds per rollout and
per phase (perf/*), and each layout's ratio to `padded`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import ROOT, alternate, child, clock, machine, medians  # noqa: E402

LAYOUTS = ("packed", "padded", "unshared")


def one_run(config: str, layout: str, rollouts: int, threads: int, exports: str | None) -> dict:
    import lightning as L
    import torch

    from callbacks.rollout import OnPolicyRollout
    from train import cli_main, derive_config

    torch.set_num_threads(threads)
    padding: list[float] = []
    timer = clock()

    class Padding(L.Callback):
        """The share of padding in the padded layout of each rollout (runs after `OnPolicyRollout` made it)."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            roll = pl_module.rollout
            P, K, mask = roll.prompt_length, roll.group_size, roll.attention_mask
            slots = mask.shape[0] // K * (P + K * (mask.shape[1] - P))
            padding.append(1 - float(mask[:, P:].sum() + mask[::K, :P].sum()) / slots)

    with tempfile.TemporaryDirectory() as tmp:
        path = derive_config(str(ROOT / config), {
            "trainer": {"limit_train_batches": rollouts, "callbacks": [], "logger": False, "enable_checkpointing": False,
                        "enable_progress_bar": False, "enable_model_summary": False},
            "model": {"init_args": {"share_prompts": layout != "unshared", "prompt_layout":
                                    "padded" if layout == "padded" else "packed", "micro_batch_tokens": None,
                                    **_exports(exports)}},
            **({"data": {"init_args": {"tokenizer": f"{exports}/sft"}}} if exports else {})}, Path(tmp) / "run.yaml")
        cli = cli_main(["--config", path], run=False)
        cli.trainer.callbacks[:0] = [timer, OnPolicyRollout(), Padding()]
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return {"seconds": timer.seconds[1:], "phases": timer.phases[1:], "padding": padding[1:]}


def _exports(exports: str | None) -> dict:
    """Model overrides: the policy without activation checkpointing, and the SFT and reward exports read from
    `exports` instead of the config's paths."""
    policy = {"activation_checkpointing": False}       # one pass, all activations kept: the layouts' own cost
    if not exports:
        return {"policy": policy}
    return {"policy": {**policy, "pretrained": f"{exports}/sft"}, "reward": {"init_args": {"path": f"{exports}/reward"}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smollm2/p3o.yaml")
    parser.add_argument("--rollouts", type=int, default=5, help="rollouts per run, the first a warm-up")
    parser.add_argument("--alternations", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layouts", nargs="*", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--exports", help="a directory holding sft/ and reward/ exports, used instead of the config's")
    parser.add_argument("--quick", action="store_true", help="the quickstart P3O config, 3 rollouts, one run each")
    parser.add_argument("--layout", choices=LAYOUTS, help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.config, args.rollouts, args.alternations = "configs/quickstart/p3o.yaml", 3, 1
    if args.layout:
        run = one_run(args.config, args.layout, args.rollouts, args.threads, args.exports)
        Path(args.json).write_text(json.dumps(run))
        return

    def run(name: str) -> dict:
        result = child([__file__, "--layout", name, "--config", args.config, "--rollouts", args.rollouts,
                        "--threads", args.threads, *(["--exports", Path(args.exports).resolve()] if args.exports else [])],
                       f"layout {name}")
        print(f"[layout] {name}: {['%.2f' % s for s in result['seconds']]} s/rollout", flush=True)
        return result

    runs = alternate(args.layouts, args.alternations, run)
    print(table({name: {key: [x for r in rs for x in r[key]] for key in ("seconds", "phases", "padding")}
                 for name, rs in runs.items()}, args))


def table(results: dict, args) -> str:
    padding = [p for r in results.values() for p in r["padding"]]
    keys = sorted({k for r in results.values() for p in r["phases"] for k in p if k.endswith("_s") and "per_s" not in k})
    median = {name: {"total": statistics.median(r["seconds"]), **{k: v for k, v in medians(r["phases"]).items()
                                                                   if k in keys}}
              for name, r in results.items()}
    base = median.get("padded")
    lines = [f"`{args.config}`, {args.rollouts - 1} measured rollouts x {args.alternations} runs per layout, "
             f"{machine(args.threads)}; padding in the padded layout: median {statistics.median(padding):.0%} "
             f"(range {min(padding):.0%}-{max(padding):.0%})", "",
             "| layout | s / rollout | " + " | ".join(keys) + " | ratio to padded |",
             "|---|---|" + "---|" * len(keys) + "---|"]
    for name, m in median.items():
        ratio = f"{m['total'] / base['total']:.2f}" if base else "-"
        lines.append(f"| {name} | {m['total']:.2f} | " + " | ".join(f"{m[k]:.2f}" for k in keys) + f" | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
    from modules.process import exit_process

    exit_process(0)        # no finalization: seconds saved, and gloo can abort there (see there)

"""One stage under each scaling preset on this machine's GPU(s): does it run, how fast, how much memory.

    python benchmarks/strategies.py                                 # quickstart P3O, every GPU preset
    python benchmarks/strategies.py --stage sft --presets fsdp deepspeed_zero3 --steps 40
    python benchmarks/strategies.py --set "model.init_args.policy.lora={r: 8, target_modules: all-linear}"

Each preset runs in its own process (`configs/<quickstart stage>.yaml` + `configs/presets/<preset>.yaml`, trainer
budget overridden), then its HF export is reloaded and generates. `single` is the baseline: the same config on
one GPU in float32 with the default strategy. Printed: a markdown table with wall time, time per optimizer step,
the ratio to the baseline, peak GPU memory, the last training reward and KL, and whether the export reloads.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = ["single", "bf16", "fsdp", "deepspeed_zero2", "deepspeed_zero3"]


def child(stage: str, preset: str, steps: int, out: Path, overrides: list[str]) -> dict:
    """Runs in the subprocess: one fit, then reload the export and generate a few tokens."""
    import torch
    import yaml
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from train import cli_main, derive_config

    source = ROOT / f"configs/quickstart/{stage}.yaml"
    callbacks = yaml.safe_load(source.read_text())["trainer"]["callbacks"]
    export = out / "exports" / f"{stage}-{preset}"
    for cb in callbacks:
        if cb["class_path"].endswith("HFExport"):
            cb["init_args"]["dirpath"] = str(export)
        if cb["class_path"].endswith("Evaluation"):
            cb["init_args"].update(every_n_batches=steps, num_prompts=64, show=0)   # at the start and the end
    override = {"trainer": {"max_steps": steps, "callbacks": callbacks, "enable_progress_bar": False,
                            "accelerator": "gpu", "devices": 1,
                            "logger": {"init_args": {"save_dir": str(out / "runs"), "name": f"{stage}-{preset}"}}}}
    config = derive_config(str(source), override, out / f"{stage}-{preset}.yaml")
    args = ["fit", "--config", config]
    if preset != "single":
        args += ["--config", str(ROOT / f"configs/presets/{preset}.yaml"), "--trainer.devices=1"]
    args += [f"--{item}" for item in overrides]
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    cli = cli_main(args)
    wall = time.perf_counter() - t0
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    history = [cb.history for cb in cli.trainer.callbacks if type(cb).__name__ == "Evaluation"]
    last = history[0][-1] if history and history[0] else {}
    is_reward = stage == "reward"
    auto = AutoModelForSequenceClassification if is_reward else AutoModelForCausalLM
    model = auto.from_pretrained(export).cuda().eval()
    tok = AutoTokenizer.from_pretrained(export)
    ids = tok(["The food was"], return_tensors="pt").to("cuda")
    with torch.no_grad():
        if is_reward:
            check = f"score {model(**ids).logits.item():+.3f}"
        else:
            out_ids = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
            check = repr(tok.decode(out_ids[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return {"preset": preset, "wall_s": wall, "steps": cli.trainer.global_step,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "export": check,
            "reward": metrics.get("train/reward", metrics.get("val/reward_accuracy")),
            "kl": metrics.get("train/kl", metrics.get("val/kl")), "gold": last.get("val/gold_reward")}


def prepare(stage: str) -> None:
    """The quickstart exports the stage starts from (`artifacts/quickstart/sft`, then `.../reward`), trained first
    on one GPU where they are missing (a fresh machine), as `make sft reward` would on the CPU."""
    text = (ROOT / f"configs/quickstart/{stage}.yaml").read_text()
    for need in ("sft", "reward"):
        if need == stage or f"artifacts/quickstart/{need}" not in text or (ROOT / f"artifacts/quickstart/{need}").is_dir():
            continue
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "train.py", "fit", "--config", f"configs/quickstart/{need}.yaml",
                               "--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.enable_progress_bar=false"],
                              capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"[strategies] the quickstart {need} stage that `{stage}` starts from failed: "
                     f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
        print(f"[strategies] made artifacts/quickstart/{need} first ({time.perf_counter() - t0:.0f} s)", flush=True)


def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="p3o", help="a quickstart config name: sft, reward, p3o, ppo, dpo, ...")
    parser.add_argument("--presets", nargs="*", default=PRESETS, choices=PRESETS)
    parser.add_argument("--steps", type=int, default=64, help="optimizer steps per run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/strategies")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra CLI override for every run, e.g. model.init_args.epochs=2 (repeatable)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.chdir(ROOT)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:
        sys.argv = sys.argv[:1]
        print("RESULT " + json.dumps(child(args.stage, args.child, args.steps, args.out, args.set)), flush=True)
        return
    prepare(args.stage)
    rows = []
    for preset in args.presets:
        cmd = [sys.executable, __file__, "--stage", args.stage, "--steps", str(args.steps), "--out", str(args.out),
               "--child", preset] + [f"--set={item}" for item in args.set]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        (args.out / f"{args.stage}-{preset}.log").write_text(proc.stdout + proc.stderr)
        result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not result:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            rows.append({"preset": preset, "error": f"exit {proc.returncode}: {tail[0][:120]}"})
        else:
            rows.append(json.loads(result[0][len("RESULT "):]))
        print(f"[strategies] {preset}: {rows[-1]}", flush=True)
    base = next((r for r in rows if r["preset"] == "single" and "error" not in r), None)
    lines = [f"stage `{args.stage}`, {args.steps} optimizer steps, 1 GPU each" + "".join(f"; `{s}`" for s in args.set),
             "", "| preset | wall s | s / step | vs single | peak GPU GiB | train reward | KL | gold | export reloads |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | failed: {r['error']} |||||||| ")
            continue
        ratio = fmt(r["wall_s"] / base["wall_s"], ".2f") if base else "n/a"
        lines.append(f"| {r['preset']} | {r['wall_s']:.1f} | {r['wall_s'] / max(r['steps'], 1):.3f} | {ratio} | "
                     f"{r['peak_gib']:.2f} | {fmt(r['reward'], '.3f')} | {fmt(r['kl'], '.3f')} | {fmt(r['gold'], '.3f')} | "
                     f"{r['export']} |")
    (args.out / f"{args.stage}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
    from modules.process import exit_process

    exit_process(0)        # no finalization: seconds saved, and gloo can abort there (see there)

"""What a training checkpoint holds, and what `modules.checkpoints` leaves out of it (the frozen weights).

    python benchmarks/checkpoint.py            # SmolLM2-135M shape: full fine-tune and LoRA r 16, a reward model
    python benchmarks/checkpoint.py --quick    # 2 layers (the test suite's run)

For each setting, one RL run through the CLI (`configs/smollm2/p3o.yaml`: P3O, AdamW; here 1 rollout of 4
prompts x 2 responses of 8 tokens) writes `last.ckpt` with `callbacks.checkpoint.StepCheckpoint`. The policy is a
random-weight SFT export of the shape and the reward a reward-model export of the same shape
(`modules.rewards.RewardModel`). The table gives the file's size, what it holds (trained weights, optimizer
state) and the frozen weights it leaves out (the reference copy or the LoRA base, and the reward model), which
every checkpoint held before: "before" is the file plus those bytes. The last column is the time of the digest
of the frozen weights that the checkpoint records in their place (`frozen_digest`, timed on the run's own module
once it has finished). Sizes depend on the shapes alone; the time on the machine (named above the table).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import QUICK, SMOLLM2, TOKENIZER, machine, random_llama, seconds  # noqa: E402

GB = 1e9


def exports(root: Path, shape: dict) -> tuple[str, str]:
    """A random-weight SFT export of `shape` (SmolLM2's tokenizer) and an untrained reward-stage export of it."""
    from modules.backbone import BackboneSpec, load_tokenizer
    from modules.export import save_pretrained
    from modules.reward_model import RewardModule

    sft, reward = root / "sft", root / "reward"
    tokenizer = load_tokenizer(TOKENIZER)
    save_pretrained(random_llama(shape, tokenizer), tokenizer, str(sft))
    module = RewardModule(BackboneSpec(pretrained=str(sft)), str(sft))
    module.configure_model()
    module.export(str(reward))
    return str(sft), str(reward)


def run(root: Path, name: str, sft: str, reward: str, lora: int) -> dict:
    """One RL run of one rollout that saves `last.ckpt`; its sizes and the digest's seconds."""
    import torch

    from modules.checkpoints import frozen_digest
    from train import cli_main, derive_config

    policy = {"pretrained": sft, "lora": {"r": lora, "lora_alpha": 2 * lora, "target_modules": "all-linear"}
              if lora else None}
    override = {
        "trainer": {"limit_train_batches": 1, "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": False, "callbacks": [
                        {"class_path": "callbacks.rollout.OnPolicyRollout"},
                        {"class_path": "callbacks.checkpoint.StepCheckpoint",
                         "init_args": {"dirpath": str(root / name), "every_n_batches": 1}}]},
        "model": {"init_args": {"policy": policy, "epochs": 1, "minibatch_groups": 4,
                                "sampling": {"max_new_tokens": 8},
                                "reward": {"class_path": "modules.rewards.RewardModel",
                                           "init_args": {"path": reward, "normalize": False}}}},
        "data": {"init_args": {"tokenizer": sft, "batch_size": 4, "source": {"init_args": {
            "num_train": 4, "num_val": 4}}}},
    }
    cli = cli_main(["fit", "--config", derive_config("configs/smollm2/p3o.yaml", override, root / f"{name}.yaml")])
    path = root / name / "last.ckpt"
    saved = torch.load(path, weights_only=False, map_location="cpu")
    def size(tensors) -> int:         # shared storage once (a tied embedding and head), as torch.save writes it
        return sum(t.numel() * t.element_size() for t in {t.untyped_storage().data_ptr(): t for t in tensors}.values())

    optimizer = [t for opt in saved["optimizer_states"] for state in opt["state"].values()
                 for t in state.values() if torch.is_tensor(t)]
    frozen = [p for p in cli.model.parameters() if not p.requires_grad]
    return {"setting": name, "file": path.stat().st_size / GB, "weights": size(saved["state_dict"].values()) / GB,
            "optimizer": size(optimizer) / GB, "left_out": size(frozen) / GB, "frozen_tensors": len(saved["frozen_digest"]),
            "digest_s": seconds(lambda: frozen_digest(cli.model))}


def table(rows: list[dict], shape_name: str) -> str:
    lines = [f"machine: {machine()}; model {shape_name} shape, random weights; reward: a reward-model export of the "
             "same shape", "",
             "| setting | checkpoint GB | trained weights GB | optimizer state GB | frozen left out GB | before GB | "
             "now / before | frozen digest s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        before = r["file"] + r["left_out"]
        lines.append(f"| {r['setting']} | {r['file']:.3f} | {r['weights']:.3f} | {r['optimizer']:.3f} | "
                     f"{r['left_out']:.3f} ({r['frozen_tensors']} tensors) | {before:.3f} | {r['file'] / before:.2f} | "
                     f"{r['digest_s']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 2-layer, width-128 model with SmolLM2's vocabulary "
                        "(the suite's run)")
    parser.add_argument("--lora", type=int, default=16, help="LoRA rank of the LoRA setting (every linear layer)")
    args = parser.parse_args(argv)
    shape, shape_name = (QUICK, "2-layer width-128 quick model") if args.quick else (SMOLLM2, "SmolLM2-135M")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sft, reward = exports(root, shape)
        rows = [run(root, "full fine-tune", sft, reward, 0), run(root, f"LoRA r {args.lora}", sft, reward, args.lora)]
    print(table(rows, shape_name))


if __name__ == "__main__":
    main()
    from modules.process import exit_process

    exit_process(0)        # no finalization: seconds saved, and gloo can abort there (see there)

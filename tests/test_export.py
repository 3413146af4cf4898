"""Nothing lost, nothing silent at the end of a run: the final checkpoint comes before the export, an export is
atomic and whole, an interrupted run keeps its checkpoint, leaves the export alone and exits non-zero."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from callbacks.export import ExportError, target_problem, write_atomically
from modules.backbone import build_causal_lm
from modules.export import save_pretrained
from tests.helpers import child_env, derived_config, tiny_rl_config
from train import cli_main, main

EXPORT = "callbacks.export.HFExport"


def export_config(tmp_path, sft_dir, export, every=0, **kwargs) -> str:
    return tiny_rl_config(tmp_path, sft_dir, checkpoint={"dirpath": str(tmp_path / "ckpt"), "every_n_batches": every},
                          extra_callbacks=[{"class_path": EXPORT, "init_args": {"dirpath": str(export)}},
                                           *kwargs.pop("extra", [])], **kwargs)


def test_a_file_in_the_export_path_stops_the_run_before_training_with_one_line(tmp_path, sft_dir, capsys):
    """Before: NotADirectoryError with 38 lines of traceback at the end of training, and no checkpoint."""
    (tmp_path / "afile").write_text("x")
    config = export_config(tmp_path, sft_dir, tmp_path / "afile" / "p3o")
    assert main(["fit", "--config", config]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: HFExport: export folder {tmp_path}/afile/p3o cannot be created: "
                              f"{tmp_path}/afile is a file")
    assert not (tmp_path / "ckpt").exists()     # refused before training, not after


def test_a_failed_export_keeps_the_weights_in_the_final_checkpoint_and_the_old_export(tmp_path, sft_dir, monkeypatch):
    """Disk full while writing the weights (a patched writer; `test_disk_full_on_a_tiny_tmpfs` does it for real): the
    final checkpoint was written first and holds every batch (cadence 3 does not land on the last of 4 rollouts),
    the previous export is untouched, and the one-line error names the folder, the cause and the checkpoint."""
    from modules import export as exporting

    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    (export / "model.safetensors").write_text("previous weights")

    def full_disk(model, tokenizer, directory):
        open(os.path.join(directory, "config.json"), "w").write("{}")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(exporting, "save_pretrained", full_disk)
    config = export_config(tmp_path, sft_dir, export, every=3)
    with pytest.raises(ExportError) as err:
        cli_main(["fit", "--config", config])
    last = tmp_path / "ckpt" / "last.ckpt"
    assert str(err.value) == (f"export to {export} failed (OSError: [Errno 28] No space left on device); the folder "
                              f"is unchanged; the trained weights are in {last} (run the same command with "
                              f"--ckpt_path {last} to export again)")
    assert torch.load(last, weights_only=False)["global_step"] == 4 * 2 * 2        # all 4 rollouts
    assert (export / "model.safetensors").read_text() == "previous weights"
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]          # no partial folder left


@pytest.mark.skipif(os.geteuid() != 0 or not sys.platform.startswith("linux"), reason="mounts a tmpfs (root, Linux)")
def test_disk_full_on_a_tiny_tmpfs_leaves_no_half_export(tmp_path, sft_dir):
    """Before: the folder kept config.json and generation_config.json but no weights, and looked like an export."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        config = export_config(tmp_path, sft_dir, disk / "p3o")
        with pytest.raises(ExportError, match=r"export to .*disk/p3o failed \(.*No space left on device.*the trained "
                                              r"weights are in .*ckpt/last.ckpt"):
            cli_main(["fit", "--config", config])
        assert os.listdir(disk) == []
    finally:
        subprocess.run(["umount", str(disk)])


def test_an_export_replaces_the_previous_one_whole_and_refuses_a_folder_of_other_files(tmp_path, sft_dir, tokenizer):
    """Before: a policy exported over a reward export left the reward's README.md and reward_stats.json beside it."""
    from modules.backbone import BackboneSpec, build_causal_lm
    from modules.export import save_pretrained

    export = tmp_path / "export"
    export.mkdir()
    for name in ("config.json", "README.md", "reward_stats.json"):   # a reward export
        (export / name).write_text("{}")
    model = build_causal_lm(BackboneSpec(pretrained=sft_dir), tokenizer)
    write_atomically(str(export), lambda tmp: save_pretrained(model, tokenizer, tmp), {"stage": "RLModule"})
    files = set(os.listdir(export))
    assert "model.safetensors" in files and "README.md" not in files and "reward_stats.json" not in files
    assert json.loads((export / "export.json").read_text())["stage"] == "RLModule"
    assert target_problem(str(export)) is None and target_problem(str(tmp_path / "new" / "dir")) is None
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("mine")
    assert target_problem(str(notes)) == (f"export folder {notes} holds something other than a model export "
                                          "(thesis.tex); an export replaces its folder whole")


@pytest.mark.slow
@pytest.mark.parametrize("signal_name, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_an_interrupted_run_keeps_its_checkpoint_leaves_the_export_and_exits_non_zero(tmp_path, sft_dir,
                                                                                       signal_name, code):
    """Before: exit 0, and the partial policy (2 of 4 rollouts) written over the export."""
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text('{"previous": true}')
    config = export_config(tmp_path, sft_dir, export, extra=[{"class_path": "tests.helpers.KillAt",
                                                              "init_args": {"at": 1, "signal": signal_name}}])
    env = child_env()
    proc = subprocess.run([sys.executable, "train.py", "fit", "--config", config], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert f"{signal_name}: training did not finish, so {export} was not written" in proc.stderr
    assert (export / "config.json").read_text() == '{"previous": true}' and len(os.listdir(export)) == 1
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 2 * 2 * 2                   # rollout 1 finished, then saved


def test_export_dir_on_the_command_line_moves_the_export_not_the_checkpoint(tmp_path, sft_dir):
    config = export_config(tmp_path, sft_dir, tmp_path / "configured")
    cli_main(["fit", "--config", config, "--export_dir", str(tmp_path / "chosen"), "--trainer.limit_train_batches=1"])
    assert (tmp_path / "chosen" / "model.safetensors").exists() and not (tmp_path / "configured").exists()
    assert (tmp_path / "ckpt" / "last.ckpt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("every", [1, 0])
def test_a_finished_run_resumed_says_it_is_complete_and_trains_nothing(tmp_path, sft_dir, caplog, every):
    """Before: a finished run resumed with a smaller limit trained nothing, said nothing and re-exported. Saved
    after its last batch (every 1) the resumed run goes through the train hooks; saved at the end (every 0)
    Lightning skips them: the same line either way, and the export is written from the checkpoint's weights."""
    config = export_config(tmp_path, sft_dir, tmp_path / "export", every=every)
    cli_main(["fit", "--config", config, "--trainer.limit_train_batches=2"])
    last = str(tmp_path / "ckpt" / "last.ckpt")
    step = torch.load(last, weights_only=False)["global_step"]
    caplog.clear()
    cli = cli_main(["fit", "--config", config, "--trainer.limit_train_batches=1", "--ckpt_path", last])
    assert cli.trainer.global_step == step
    assert "the run in the checkpoint is already complete (2 training batches)" in caplog.text
    assert (tmp_path / "export" / "model.safetensors").exists()


@pytest.mark.slow
def test_after_a_resume_the_first_evaluation_is_labelled_with_the_batches_done(tmp_path, sft_dir):
    """Before: a checkpoint taken after batch 3 evaluated as 'after 2 batches', in frontier.csv and TensorBoard."""
    config = tiny_rl_config(tmp_path, sft_dir, checkpoint={"dirpath": str(tmp_path / "ckpt"), "every_n_batches": 1},
                            extra_callbacks=[{"class_path": "tests.helpers.KillAt", "init_args": {"at": 3}}])
    data = yaml.safe_load(open(config))
    for cb in data["trainer"]["callbacks"]:
        if cb["class_path"].endswith("Evaluation"):
            cb["init_args"]["every_n_batches"] = 2
    yaml.safe_dump(data, open(config, "w"))
    env = child_env()
    proc = subprocess.run([sys.executable, "train.py", "fit", "--config", config], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == -9
    data["trainer"]["callbacks"] = [cb for cb in data["trainer"]["callbacks"] if not cb["class_path"].endswith("KillAt")]
    yaml.safe_dump(data, open(config, "w"))
    cli = cli_main(["fit", "--config", config, "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt")])
    evaluation = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "Evaluation")
    assert [row["step"] for row in evaluation.history] == [3, 4]


def test_an_unmerged_lora_export_points_at_its_base_in_the_final_folder(tmp_path, sft_dir, tokenizer):
    """`merge_lora: false` through the atomic write: the adapter records `<final folder>/base`, not the temporary
    folder it was written in, and loads with plain transformers + peft from the final folder."""
    from transformers import AutoModelForCausalLM

    from modules.backbone import BackboneSpec, build_causal_lm
    from modules.export import export_model

    spec = BackboneSpec(pretrained=sft_dir, lora={"r": 4})
    model = build_causal_lm(spec, tokenizer)
    export = tmp_path / "lora"
    write_atomically(str(export), lambda tmp: export_model(model, spec, tokenizer, tmp, merge_lora=False,
                                                           final_dir=str(export)), {"stage": "RLModule"})
    config = json.loads((export / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(export / "base")
    loaded = AutoModelForCausalLM.from_pretrained(export)
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


def test_an_export_never_writes_nonfinite_weights(tiny_spec, tokenizer, tmp_path):
    model = build_causal_lm(tiny_spec, tokenizer)
    with torch.no_grad():
        model.lm_head.weight[3, 2] = float("nan")
    with pytest.raises(ValueError, match="parameter 'lm_head.weight' holds NaN or inf; nothing was written"):
        save_pretrained(model, tokenizer, str(tmp_path / "out"))
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("stage,attr", [("sft", "policy"), ("reward", "scorer"), ("offline_dpo", "policy"),
                                        ("preference", "scorer")])
def test_every_stage_under_bf16_mixed_trains_lora_over_a_bf16_base_and_exports_the_fp32_merge(tmp_path, sft_dir,
                                                                                              stage, attr):
    """SFT, reward, offline DPO and the pairwise preference stage, each a 2-batch LoRA fit under bf16-mixed
    (`modules.backbone.linears_in`, as `tests/test_rl.py` checks for the RL policy): the frozen base linears hold
    bf16 and the trained parameters (adapters, a scorer's head) fp32; only those change; and the export (`HFExport`,
    which calibrates a reward or preference model first: under autocast, which the bf16 base needs) is the trained
    parameters loaded into a fresh fp32 build and merged, bit for bit (fp32, not the bf16 base)."""
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    from modules.backbone import BackboneSpec, build_scorer

    lora = {"r": 4, "lora_alpha": 8}
    key = "policy" if stage == "offline_dpo" else "backbone"
    model_args = {key: {"pretrained": sft_dir, "config": None, "lora": lora}}
    if stage in ("reward", "preference"):
        model_args["calibration_prompts"] = 4
    config = derived_config(f"configs/quickstart/{stage}.yaml", tmp_path, {
        "trainer": {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1, "precision": "bf16-mixed",
                    "callbacks": [{"class_path": EXPORT, "init_args": {"dirpath": str(tmp_path / "export")}}],
                    "enable_checkpointing": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "logger": {"init_args": {"save_dir": str(tmp_path / "runs")}}},
        "model": {"init_args": model_args},
        "data": {"init_args": {"tokenizer": sft_dir, "batch_size": 4,
                               "source": {"init_args": {"num_train": 16, "num_val": 8,
                                                        "cache_dir": str(tmp_path / "tok")}}}},
    }, f"{stage}.yaml")
    cli = cli_main(["fit", "--config", config])
    module = cli.model
    model = getattr(module, attr)
    base = [m.base_layer for m in model.modules() if isinstance(m, LoraLayer)]
    assert base and {m.weight.dtype for m in base} == {torch.bfloat16}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and {p.dtype for p in trainable.values()} == {torch.float32}

    build = build_causal_lm if attr == "policy" else build_scorer
    start = build(BackboneSpec(pretrained=sft_dir, lora=lora), module.tokenizer)
    before = start.state_dict()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k].to(v.dtype))}
    assert changed and changed <= set(trainable)
    start.load_state_dict({k: v for k, v in model.state_dict().items() if k in trainable}, strict=False)
    expected = start.merge_and_unload().state_dict()
    written = load_file(tmp_path / "export" / "model.safetensors")
    assert {v.dtype for v in written.values()} == {torch.float32}
    assert written and all(torch.equal(v, expected[k]) for k, v in written.items())

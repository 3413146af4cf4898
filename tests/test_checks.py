"""Settings that cannot train stop before anything is built, with one line naming the field; settings that silently
do less are warned about; a checkpoint of another objective is named as such."""
import logging

import pytest
import torch

from modules.checks import ConfigError, config_problem, config_warnings
from tests.helpers import tiny_rl_config
from train import cli_main, main

P3O = "configs/quickstart/p3o.yaml"


@pytest.mark.parametrize("override, line", [
    ("--model.init_args.epochs=0", "error: model.init_args.epochs: 0; expected at least 1 (passes of updates over "
                                   "each rollout; 0 samples rollouts and never updates)"),
    ("--model.init_args.minibatch_groups=0", "error: model.init_args.minibatch_groups: 0; expected at least 1 "
                                             "(prompts per update)"),
    ("--model.init_args.sampling.max_new_tokens=0", "error: model.init_args.sampling.max_new_tokens: 0; expected at "
                                                    "least 1 (tokens sampled per response)"),
    ("--model.init_args.optimizer.init_args.lr=-1.0e-3", "error: model.init_args.optimizer.init_args.lr: -0.001; "
                                                         "expected a finite learning rate >= 0"),
    ("--ckpt_path=/no/such/last.ckpt", "error: ckpt_path: /no/such/last.ckpt does not exist"),
    ("--data.init_args.batch_size=0", "error: data.init_args.batch_size: 0; expected at least 1 (items per batch or "
                                      "forward)"),
    ("--model.init_args.micro_batch_tokens=0", "error: model.init_args.micro_batch_tokens: 0; expected at least 1 "
                                               "(real tokens per forward), or null for one pass"),
    ("--model.init_args.logprob_chunk=-5", "error: model.init_args.logprob_chunk: -5; expected >= 0 (tokens per LM-head "
                                           "chunk; 0: the whole logits at once), or null"),
    ("--trainer.strategy=fsdp", "error: trainer.strategy: fsdp is FSDP1, which no stage supports any more; shard with "
                                "FSDP2: --config configs/presets/fsdp.yaml (strategy modules.sharding.FSDP2Strategy)"),
])
@pytest.mark.slow
def test_settings_that_cannot_train_stop_with_one_line_before_anything_is_built(tmp_path, sft_dir, capsys, override,
                                                                                 line):
    """Before: epochs 0 sampled 3 rollouts, made 0 steps and exited 0; max_new_tokens 0 and a negative learning rate
    failed inside transformers / torch after the models were built, with 47 lines of traceback; a negative
    logprob_chunk trained the SFT stage without a word. FSDP1, retired, points to FSDP2. (The checks read every
    stage's config alike: `test_every_stage_gets_the_same_config_checks`.)"""
    config = tiny_rl_config(tmp_path, sft_dir)
    with pytest.raises(SystemExit) as stop:
        cli_main(["fit", "--config", config, override])
    assert str(stop.value) == line


@pytest.mark.parametrize("stage", ["sft", "reward", "preference", "offline_dpo", "p3o"])
def test_every_stage_gets_the_same_config_checks(stage, monkeypatch):
    """`config_problem` reads any stage's parsed config: the SFT, reward, preference and offline DPO modules take
    `micro_batch_tokens` (and SFT / offline DPO `logprob_chunk`) as the RL module does, and are checked alike; so is
    a `batch_size` anywhere (data, reward and judge models, callbacks). Before: a calibration of 1 prompt exported a
    reward model whose scale was NaN (the std of one score), found only when RL stopped on NaN rewards.
    (The other stages' exports count as present: the paths' own check is another test's.)"""
    import yaml

    from modules import checks
    from modules.checks import config_problem

    monkeypatch.setattr(checks.os.path, "exists", lambda path: True)

    config = yaml.safe_load(open(f"configs/quickstart/{stage}.yaml"))
    config["model"]["init_args"].update(micro_batch_tokens=0)
    assert config_problem(config) == ("model.init_args.micro_batch_tokens: 0; expected at least 1 (real tokens per "
                                      "forward), or null for one pass")
    config["model"]["init_args"].update(micro_batch_tokens=None, logprob_chunk=-1)
    assert config_problem(config).startswith("model.init_args.logprob_chunk: -1; expected >= 0")
    config["model"]["init_args"].update(logprob_chunk=None)
    config["data"]["init_args"].update(batch_size=0)
    assert config_problem(config) == "data.init_args.batch_size: 0; expected at least 1 (items per batch or forward)"
    if stage in ("reward", "preference"):
        config["data"]["init_args"].update(batch_size=8)
        config["model"]["init_args"].update(calibration_prompts=1)
        assert config_problem(config) == ("model.init_args.calibration_prompts: 1; expected at least 2 (the std of "
                                          "their scores is the reward's scale)")


def test_a_run_limited_to_zero_batches_is_warned_about():
    """`max_steps: 0`, `max_epochs: 0` or `limit_train_batches: 0` stop the run before its first batch, exit 0 and
    write no export (Lightning says so in an info line, or not at all). Zero batches is a setting Lightning
    documents (`benchmarks/memory.py --build` stops so once the models are built), so it runs, with a warning."""
    for key in ("max_steps", "max_epochs", "limit_train_batches"):
        config = {"trainer": {key: 0}}
        assert config_problem(config) is None
        assert config_warnings(config) == [f"trainer.{key}=0: the run stops before its first batch; nothing is trained "
                                           "and no export is written (`python train.py validate` evaluates without "
                                           "training)"]
    assert config_warnings({"trainer": {"max_steps": -1, "max_epochs": None, "limit_train_batches": 0.5}}) == []


def test_more_minibatch_groups_than_prompts_is_warned_about():
    """Before: minibatch_groups 64 with 32 prompts per batch was silently one minibatch per epoch."""
    config = {"model": {"init_args": {"minibatch_groups": 64, "epochs": 4}}, "data": {"init_args": {"batch_size": 32}}}
    assert config_problem(config) is None
    assert config_warnings(config) == ["model.init_args.minibatch_groups=64 is more than the 32 prompts of a rollout "
                                       "(data.init_args.batch_size): each epoch is one minibatch of 32 prompts, 4 "
                                       "optimizer steps per rollout"]
    config["model"]["init_args"]["minibatch_groups"] = 8
    assert config_warnings(config) == []
    config["model"]["init_args"]["keep_groups"] = 4          # dynamic sampling: 4 of the 32 prompts are trained on
    assert config_warnings(config) == ["model.init_args.minibatch_groups=8 is more than the 4 prompts of a rollout "
                                       "(model.init_args.keep_groups): each epoch is one minibatch of 4 prompts, 4 "
                                       "optimizer steps per rollout"]


def test_the_warning_reaches_the_console_of_a_run(tmp_path, sft_dir, caplog):
    config = tiny_rl_config(tmp_path, sft_dir)
    with caplog.at_level(logging.WARNING):
        cli_main(["--config", config, "--model.init_args.minibatch_groups=64"], run=False)
    assert "warning: model.init_args.minibatch_groups=64 is more than the 4 prompts of a rollout" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [("ppo", "p3o"), ("p3o", "rloo")])
def test_a_checkpoint_of_another_objective_is_named_in_one_line(tmp_path, sft_dir, first, then):
    """Before: torch's list of unexpected keys."""
    names = {"ppo": "modules.objectives.ppo.PPO", "p3o": "modules.objectives.p3o.P3O",
             "rloo": "modules.objectives.rloo.RLOO"}
    configs = {name: tiny_rl_config(tmp_path, sft_dir, source=f"configs/quickstart/{name}.yaml", name=f"{name}.yaml",
                                    checkpoint={"dirpath": str(tmp_path / name)}) for name in (first, then)}
    value = [f"--model.init_args.value_model.pretrained={sft_dir}"] if first == "ppo" else []
    cli_main(["fit", "--config", configs[first], "--trainer.limit_train_batches=1", *value])
    last = tmp_path / first / "last.ckpt"
    with pytest.raises(ConfigError, match=rf"^the checkpoint was written by a run of {names[first]}; this run's "
                                          rf"objective is {names[then]}: resume with the config that wrote it"):
        cli_main(["fit", "--config", configs[then], "--ckpt_path", str(last)])
    if first == "ppo":   # a checkpoint from before the objective was recorded: told apart by its parameters
        state = torch.load(last, weights_only=False)
        del state["objective"]
        torch.save(state, last)
        with pytest.raises(ConfigError, match="written by a run of another objective .its parameters differ"):
            cli_main(["fit", "--config", configs[then], "--ckpt_path", str(last)])


def test_replaced_nonfinite_rewards_are_counted_on_the_console(tmp_path, sft_dir, caplog):
    """Before: only in TensorBoard."""
    config = tiny_rl_config(tmp_path, sft_dir, model={"nonfinite_reward": -1.0, "reward": {
        "class_path": "tests.helpers.BadReward", "init_args": {"mode": "nan"}}})
    with caplog.at_level(logging.WARNING):
        cli_main(["fit", "--config", config, "--trainer.limit_train_batches=1"])
    assert "reward tests.helpers.BadReward: 1 of 8 rewards were NaN or inf, replaced by nonfinite_reward=-1.0" \
        in caplog.text


def test_main_turns_a_user_error_into_one_line_and_exit_code_1(tmp_path, sft_dir, capsys):
    config = tiny_rl_config(tmp_path, sft_dir, model={"reward": {"class_path": "tests.helpers.BadReward",
                                                                 "init_args": {"mode": "short"}}})
    assert main(["fit", "--config", config]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: reward tests.helpers.BadReward returned 7 values for 8 responses")


@pytest.mark.parametrize("override, line", [
    ("--model.init_args.objective.k=1", "error: P3O: k must be >= 2 responses per prompt, got 1"),
    ("--model.init_args.policy.config={{model_type: llama}}",
     "error: BackboneSpec: both 'pretrained' ({sft_dir}) and 'config' are set; set exactly one (a later --config or "
     "command-line value for one keeps the other from the config before it: give both, e.g. {{pretrained: <path>, "
     "config: null}})"),
    ("--data.init_args.source.init_args.negative_rate=0.9",
     "error: ReviewTask: positive_rate + negative_rate must lie in [0, 1]"),
    ("--trainer.devices=0", "error: `Trainer(devices='0')` value is not a valid input using cpu accelerator."),
    ("--model.init_args.sampling.temperature=0", "error: SamplingConfig: temperature=0.0; expected a finite number > 0 "
                                                 "(it also divides every logprob; do_sample: false samples greedily)"),
    ("--model.init_args.sampling.top_p=1.5", "error: SamplingConfig: top_p=1.5; expected 0 <= top_p <= 1 (1: off)"),
    ("--model.init_args.sampling.top_k=-1", "error: SamplingConfig: top_k=-1; expected >= 0 (0: off)"),
    ("--model.init_args.max_grad_norm=0", "error: RLModule: max_grad_norm=0.0; expected > 0, or null for no clipping"),
    ("--trainer.accumulate_grad_batches=2",
     "error: trainer.accumulate_grad_batches: 2; the RL stage makes one optimizer step per minibatch of "
     "model.init_args.minibatch_groups prompts and accumulates its micro-batches (model.init_args.micro_batch_tokens) "
     "itself: set those"),
    ("--trainer.gradient_clip_val=1.0", "error: trainer.gradient_clip_val: 1.0; the RL stage clips the gradient norm "
                                        "itself: set model.init_args.max_grad_norm"),
    ("--model.init_args.policy.lora={{r: 4, target_modules: [q_projj]}}",
     "error: lora {{'r': 4, 'target_modules': ['q_projj']}}: peft cannot apply it: "),
    ("--model.init_args.policy.lora={{r: 4, alpha: 8}}", "error: lora {{'r': 4, 'alpha': 8}}: peft cannot apply it: "
                                                       "LoraConfig.__init__() got an unexpected keyword argument 'alpha'"),
    ("--model.init_args.policy.pretrained={tmp_path}/empty",
     "error: pretrained {tmp_path}/empty: transformers cannot build it: "),
    ("--model.init_args.policy.pretrained={tmp_path}/no-weights",
     "error: pretrained {tmp_path}/no-weights: transformers cannot build it: "),
    ("--model.init_args.engine={{class_path: modules.engines.Sampler, init_args: {{max_logprob_diff: 0}}}}",
     "error: Sampler: max_logprob_diff=0.0; expected a finite number > 0 (rounding alone gives 1e-5 to 1e-2), or null "
     "(never stop)"),
    ("--model.init_args.engine={{class_path: modules.engines.VLLM, init_args: {{gpu_memory_utilization: 30}}}}",
     "error: VLLM: gpu_memory_utilization=30.0; expected a fraction in (0, 1]"),
    ("--model.init_args.engine={{class_path: modules.engines.VLLM, init_args: {{tensor_parallel_size: 0}}}}",
     "error: VLLM: tensor_parallel_size=0; expected >= 1"),
    ("--model.init_args.engine={{class_path: modules.engines.VLLM, init_args: {{cpu_kv_cache_gb: 0}}}}",
     "error: VLLM: cpu_kv_cache_gb=0.0; expected a finite number of GiB > 0"),
    ("--model.init_args.engine={{class_path: modules.engines.VLLM, init_args: {{correction: {{min: 2, max: 0.5}}}}}}",
     "error: MismatchCorrection: min=2.0, max=0.5; expected min < max (otherwise every token is masked, or clamped to "
     "one weight)"),
    ("--model.init_args.engine={{class_path: modules.engines.VLLM, init_args: {{correction: {{max: -1}}}}}}",
     "error: MismatchCorrection: max=-1.0; expected a finite weight >= 0, or null (no bound)"),
    ("--data.init_args.source={{class_path: datamodules.sources.LocalFiles, init_args: {{train: pairs.jsonl, "
     "val_fraction: 1.5}}}}", "error: LocalFiles: val_fraction=1.5; expected a share of the training file between 0 "
                              "and 1 (at least one record is held out)"),
], ids=["objective", "backbone", "source", "devices", "temperature", "top_p", "top_k", "max_grad_norm",
        "accumulate", "clip", "lora_targets", "lora_argument", "not_a_model", "no_weights", "logprob_diff",
        "gpu_memory", "tensor_parallel", "kv_cache", "correction_bounds", "correction_negative", "val_fraction"])
def test_a_constructors_complaint_about_its_settings_is_one_line(tmp_path, sft_dir, capsys, override, line):
    """A class built from the config that refuses its values (an objective, a backbone spec, a data source, the
    trainer), transformers or peft refusing a model or LoRA setting, Lightning settings the RL stage does its own
    way: the message, one line, exit code 1. Before: a stack trace (jsonargparse's ending in the whole parsed
    config, the message in the middle; Lightning's advising to switch the RL stage to automatic optimization)."""
    import shutil

    from train import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "no-weights").mkdir()
    shutil.copy(f"{sft_dir}/config.json", tmp_path / "no-weights")
    config = tiny_rl_config(tmp_path, sft_dir)
    assert main(["fit", "--config", config, override.format(tmp_path=tmp_path)]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    line = line.format(sft_dir=sft_dir, tmp_path=tmp_path)     # (after "cannot ... it: ", the library's own words)
    assert last.startswith(line) and len(last) > len(line) + 20 if line.endswith(": ") else last == line


def test_an_error_that_is_not_about_a_setting_keeps_its_traceback(tmp_path, sft_dir):
    """A reward whose constructor fails for another reason (here a RuntimeError) is a bug to debug: `main` lets it
    through, and `python train.py` prints its traceback."""
    from train import main, root_cause

    config = tiny_rl_config(tmp_path, sft_dir, model={"reward": {"class_path": "tests.helpers.BrokenReward"}})
    with pytest.raises(Exception) as raised:
        main(["fit", "--config", config])
    assert isinstance(root_cause(raised.value), RuntimeError) and "BrokenReward" in str(root_cause(raised.value))


def test_a_judges_model_that_does_not_exist_is_named_before_anything_is_built():
    """`LLMJudge`'s `model`, as the RL reward or as an `Evaluation` judge (under trainer.callbacks, whose other
    paths may be outputs), is checked like `pretrained` and `path`. Before: a local path the judge could not find
    went to the hub as a repository id (huggingface_hub's error, or 1 minute of retries and 160 lines of traceback
    for 'artifacts/...')."""
    judge = {"class_path": "modules.judges.LLMJudge", "init_args": {"model": "artifacts/none/sft"}}
    evaluation = {"class_path": "callbacks.evaluation.Evaluation", "init_args": {"judge": judge}}
    exists = "artifacts/none/sft does not exist (a local directory or file was expected; hub ids look like 'org/name')"
    assert config_problem({"model": {"init_args": {"reward": judge}}}) == f"model.init_args.reward.init_args.model: {exists}"
    assert config_problem({"trainer": {"callbacks": [evaluation]}}) == \
        f"trainer.callbacks.0.init_args.judge.init_args.model: {exists}"
    assert config_problem({"trainer": {"callbacks": [{"init_args": {"path": "out/metrics.csv"}}]}}) is None  # an output


def test_a_tokenizer_the_hub_cannot_give_is_one_line(tmp_path, sft_dir, capsys, monkeypatch):
    """A hub id out of reach as `data.init_args.tokenizer` (or an `LLMJudge`'s model): transformers' OSError over
    huggingface_hub's over httpx's, raised while jsonargparse builds the classes. Before: its 150-line traceback (the
    chain's first error, httpx's, is not about a setting); now the project's error in the chain, one line. (Offline,
    as here, the hub is not asked: transformers' error is simulated.)"""
    from transformers import AutoTokenizer

    from train import main

    real = AutoTokenizer.from_pretrained

    def offline(*args, **kwargs):
        if kwargs.get("pretrained_model_name_or_path", args[0] if args else None) != "someorg/sometokenizer":
            return real(*args, **kwargs)
        try:
            raise RuntimeError("[Errno -2] Name or service not known")          # (httpx's ConnectError)
        except RuntimeError as err:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files") from err

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", offline)
    config = tiny_rl_config(tmp_path, sft_dir)
    assert main(["fit", "--config", config, "--data.init_args.tokenizer=someorg/sometokenizer"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: someorg/sometokenizer: transformers cannot load its tokenizer: We couldn't connect to "
        "'https://huggingface.co' to load the files")


def test_an_rl_run_without_its_rollout_callback_stops_before_building_anything(tmp_path, sft_dir, capsys):
    """Before: RuntimeError's traceback at the first training batch, after the models and the first evaluation."""
    import yaml

    from train import main

    config = tiny_rl_config(tmp_path, sft_dir)
    data = yaml.safe_load(open(config))
    data["trainer"]["callbacks"] = [cb for cb in data["trainer"]["callbacks"] if "OnPolicyRollout" not in cb["class_path"]]
    yaml.safe_dump(data, open(config, "w"))
    assert main(["fit", "--config", config]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: trainer.callbacks: the RL stage needs callbacks.rollout.OnPolicyRollout, which samples its rollouts; "
        "add it")


def test_a_callbacks_complaint_is_one_line_too(tmp_path, sft_dir, capsys):
    """Before: a negative num_prompts evaluated all but the last prompts of the val split, silently."""
    from train import main

    config = tiny_rl_config(tmp_path, sft_dir, evaluation={"num_prompts": -8})
    assert main(["fit", "--config", config]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: Evaluation: num_prompts=-8; expected at least 1"


def test_the_root_cause_follows_what_python_prints_as_the_cause():
    """`raise ... from err` and an error raised while handling another lead to the first; `from None` stops."""
    from train import root_cause

    def chained(suppress: bool):
        try:
            try:
                raise KeyError("first")
            except KeyError as first:
                raise ValueError("second") from (None if suppress else first)
        except ValueError:
            try:
                raise RuntimeError("third")             # (while handling: __context__)
            except RuntimeError as third:
                return third

    assert isinstance(root_cause(chained(suppress=False)), KeyError)
    assert str(root_cause(chained(suppress=True))) == "second"
    plain = OSError("alone")
    assert root_cause(plain) is plain


def test_a_model_whose_own_tokenizer_gives_other_ids_stops_the_run(tmp_path, sft_dir, tokenizer, capsys):
    """The run's tokenizer (data.init_args.tokenizer) is another one than the SFT export's: every id would mean
    another token to the model. Before: it trained on, silently (two tokenizers of the embedded task, trained on
    different samples, give most tokens other ids, and samples still read as reviews). A run's tokenizer with
    tokens added after the model's passes."""
    from datamodules.task import ReviewTask
    from modules.backbone import check_tokenizer, load_tokenizer
    from train import main

    other = ReviewTask(num_train=50, num_val=10, seed=7, cache_dir=str(tmp_path / "tok")).tokenizer()
    assert load_tokenizer(other).get_vocab() != tokenizer.get_vocab()
    config = tiny_rl_config(tmp_path, sft_dir)
    assert main(["fit", "--config", config, f"--data.init_args.tokenizer={other}"]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"error: pretrained {sft_dir}: its tokenizer gives ") and line.endswith(
        f"here; train with the model's own (data.init_args.tokenizer: {sft_dir})"), line
    grown = load_tokenizer(sft_dir)
    grown.add_tokens(["<extra_token>"])
    check_tokenizer(sft_dir, grown)


def test_an_evaluation_on_a_stage_without_a_policy_stops_before_training(tmp_path, sft_dir, capsys):
    """The Evaluation callback in the reward stage's config. Before: an AttributeError once training had ended."""
    from tests.helpers import tiny_stage_config
    from train import main

    evaluation = {"class_path": "callbacks.evaluation.Evaluation", "init_args": {"num_prompts": 4}}
    config = tiny_stage_config(tmp_path, "reward", sft_dir, "reward.yaml", [evaluation])
    assert main(["fit", "--config", config]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: callbacks.evaluation.Evaluation: RewardModule has no policy to sample; it evaluates the SFT, RL and "
        "offline DPO stages (a reward model reports with callbacks.reward_report.RewardReport)")


@pytest.mark.parametrize("override, block, field", [
    ("--model.init_args.policy.lora=null", "policy", "lora"),
    ("--model.init_args.objective.init_args.reward_clip=null", "objective", "reward_clip"),
    ("--model.init_args.policy.pretrained=None", "policy", "pretrained"),
], ids=["dataclass_field", "class_argument", "string_field"])
def test_a_null_below_a_class_argument_is_refused_with_the_dict_form_that_reads_it(override, block, field, capsys,
                                                                                   tmp_path):
    """jsonargparse (4.53) reads `--model.init_args.policy.lora=null` as the string 'None': LoRA could not be
    switched off from the command line (a page of union errors), and `policy.pretrained=null` became a model path
    named None, silently. The one-line refusal names the dict form; the dict form reads null and keeps the block's
    other fields from the config (the backbone's pretrained path and LoRA; the objective's class and arguments)."""
    import yaml

    from train import derive_config

    config = derive_config("configs/smollm2/p3o.yaml", {"model": {"init_args": {"objective": {"init_args": {
        "reward_clip": 5.0}}}}}, tmp_path / "p3o.yaml")           # (an optional argument of a class, set)
    hint = f"--model.init_args.{block}={{{field}: null}}"
    with pytest.raises(SystemExit) as stop:
        cli_main(["fit", "--config", config, override])
    assert str(stop.value) == (f"error: {override}: jsonargparse reads a null below a class's own arguments as the "
                               f"string 'None'; write the enclosing block as a dict, which keeps its other fields: "
                               f"--model.init_args.{block}='{{{field}: null}}'")
    with pytest.raises(SystemExit) as printed:
        cli_main(["fit", "--config", config, hint, "--print_config"])
    assert printed.value.code in (None, 0)
    parsed = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"][block]
    given = yaml.safe_load(open(config))["model"]["init_args"][block]
    assert parsed.get("class_path") == given.get("class_path")
    parsed, given = parsed.get("init_args", parsed), given.get("init_args", given)   # (a class: its arguments)
    assert parsed[field] is None and given.get(field) is not None
    assert {k: parsed[k] for k in given if k != field} == {k: v for k, v in given.items() if k != field}


def test_nulls_that_jsonargparse_reads_are_left_alone():
    """A class's own argument, a trainer field and a config file's nulls are read correctly: nothing to refuse."""
    from modules.checks import command_line_problem

    assert command_line_problem(["fit", "--model.init_args.value_model=null", "--model.value_model", "null",
                                 "--trainer.logger.init_args.version=null", "--data.init_args.source=null",
                                 "--model.init_args.policy.lora={r: 4}", "--config", "null"]) is None
    assert command_line_problem(["--model.init_args.policy.lora", "~"]).startswith("--model.init_args.policy.lora=~:")


@pytest.mark.parametrize("override, field", [(["--optimizer=torch.optim.SGD", "--optimizer.lr=0.1"], "optimizer"),
                                             (["--lr_scheduler", "torch.optim.lr_scheduler.StepLR"], "scheduler")])
def test_lightningclis_optimizer_options_point_to_the_stages_own(tmp_path, sft_dir, override, field):
    """Each stage takes its optimizer and scheduler as init arguments. Before, LightningCLI's `--optimizer` and
    `--lr_scheduler` were listed in --help too and replaced the stage's `configure_optimizers`: the SFT stage (its
    policy built later, in `configure_model`) stopped with "optimizer got an empty parameter list"; now one line
    names the stage's field. The stage's own field still parses (the scheduler stepped as documented)."""
    from train import main

    config = tiny_rl_config(tmp_path, sft_dir)
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", config, *override])
    assert str(stop.value) == (f"error: {override[0]}: each stage takes its {field} in its model block: "
                               f"--model.init_args.{field}=<class path> and --model.init_args.{field}.<argument>=<value>")
    cli = cli_main(["--config", config, "--model.init_args.scheduler=torch.optim.lr_scheduler.StepLR",
                    "--model.init_args.scheduler.step_size=3", "--model.init_args.optimizer.lr=0.5"], run=False)
    assert "optimizer" not in cli.config and "lr_scheduler" not in cli.config
    optimizer = cli.model.optimizer_factory([torch.nn.Parameter(torch.zeros(1))])
    assert optimizer.param_groups[0]["lr"] == 0.5 and cli.model.scheduler_factory(optimizer).step_size == 3


def test_check_positions_names_the_settings_and_the_model_that_cannot_hold_them():
    """12 + 120 = 132 tokens do not fit a model of 128 positions; 12 + 116 = 128 do, and so does a model that does
    not say (no `max_position_embeddings`) or none at all (a module without a value model)."""
    from types import SimpleNamespace

    from modules.checks import ConfigError, check_positions

    short, unsaid = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=128)), SimpleNamespace(config=None)
    with pytest.raises(ConfigError) as raised:
        check_positions("RLModule", 132, "max_prompt_length (12) + max_new_tokens (120)",
                        {"policy": unsaid, "value model": None, "reward model": short})
    assert str(raised.value) == ("RLModule: max_prompt_length (12) + max_new_tokens (120) = 132 tokens per sequence, "
                                 "more than the reward model's max_position_embeddings (128); lower them")
    check_positions("RLModule", 128, "", {"policy": short, "value model": None})


@pytest.mark.parametrize("stage, override, line", [
    ("rl", "--model.init_args.sampling.max_new_tokens=120",
     "error: RLModule: data max_prompt_length (12) + model sampling.max_new_tokens (120) = 132 tokens per sequence, "
     "more than the policy's max_position_embeddings (128); lower them"),
    ("evaluation", None,
     "error: callbacks.evaluation.Evaluation: data max_prompt_length (12) + evaluation sampling.max_new_tokens (117) "
     "= 129 tokens per sequence, more than the policy's max_position_embeddings (128); lower them"),
    ("sft", "--data.init_args.max_length=129",
     "error: SFTModule: data max_length (129) = 129 tokens per sequence, more than the policy's "
     "max_position_embeddings (128); lower them"),
], ids=["rollout", "evaluation", "sft"])
@pytest.mark.slow
def test_sequences_longer_than_the_models_positions_stop_before_training(tmp_path, sft_dir, capsys, stage, override,
                                                                         line):
    """Before: the tiny Llama (rotary, 128 positions) sampled and trained on positions 128 and up without a word
    (transformers printed a 'friendly reminder' once); a model with learned positions fails there with an index
    error, on a GPU a device-side assert. Checked once the models are built, before the first rollout or batch."""
    from tests.helpers import tiny_stage_config
    from train import main

    config = (tiny_rl_config(tmp_path, sft_dir) if stage == "rl" else
              tiny_rl_config(tmp_path, sft_dir, evaluation={"sampling": {"max_new_tokens": 117}}) if stage == "evaluation"
              else tiny_stage_config(tmp_path, "sft", sft_dir, "s.yaml"))
    assert main(["fit", "--config", config] + ([override] if override else [])) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == line


@pytest.mark.slow
def test_a_reward_stage_with_one_held_out_prompt_stops_before_training(tmp_path, sft_dir, capsys):
    """Before: it trained, then calibrated on the one validation prompt and exported std NaN (the std of one score),
    which made every reward of the RL run after it NaN."""
    from tests.helpers import tiny_stage_config
    from train import main

    config = tiny_stage_config(tmp_path, "reward", sft_dir, "r.yaml")
    assert main(["fit", "--config", config, "--data.init_args.source.init_args.num_val=1"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: RewardModule: the validation split has 1 record; the calibration after training needs at least 2 "
        "held-out prompts (the std of their scores is the export's scale): add records")

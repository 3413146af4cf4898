"""Test helpers: small configs derived from the shipped YAMLs, a training run in its own process, tiny inputs, and
callbacks and rewards that record or break a run."""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
import yaml

from modules.engines import MismatchCorrection, Sampler
from tests.conftest import TINY
from train import derive_config, merge_config

TINY_SHAPE = {k: v for k, v in TINY.items() if k != "model_type"}      # the tiny model's widths, any architecture


def child_env() -> dict:
    """The environment of a `train.py` or benchmark child process: this one's, with the repository root first on
    `PYTHONPATH` and whatever was there kept (a machine whose packages come from `PYTHONPATH`, as `.ci/gpu`'s)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}


def run_train(config: str, *args: str, expect: int | tuple[int, ...] = 0, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python train.py fit --config CONFIG ARGS` in a fresh process from the repository root; asserts its exit
    code (`expect`, e.g. 130 for Ctrl-C or -9 for SIGKILL; a tuple: any of them) and returns it."""
    proc = subprocess.run([sys.executable, "train.py", "fit", "--config", config, *args], capture_output=True,
                          text=True, timeout=timeout, env=child_env())
    assert proc.returncode in (expect if isinstance(expect, tuple) else (expect,)), proc.stderr[-3000:]
    return proc


def grouped_rows(tokenizer, K: int = 3):
    """Two prompts (the first left-padded by 2) x K responses of 6 tokens; response 1 stops after 3 tokens and
    response 4 after 1 (EOS, then padding): the layouts that differ from one row per response."""
    torch.manual_seed(0)
    prompts = torch.randint(3, 40, (2, 5)).repeat_interleave(K, 0)
    prompt_mask = torch.ones_like(prompts)
    prompt_mask[:K, :2] = 0
    responses = torch.randint(3, 40, (2 * K, 6))
    response_mask = torch.ones_like(responses)
    response_mask[1, 3:] = 0
    response_mask[4, 1:] = 0
    responses[response_mask == 0] = tokenizer.pad_token_id
    return torch.cat([prompts, responses], 1), torch.cat([prompt_mask, response_mask], 1), response_mask


def logprobs_and_grads(model, ids, mask, response_mask, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """`response_logprobs(model, ids, mask, 5, 0.7, **kwargs)` for `grouped_rows`' batch (prompt length 5,
    temperature 0.7), and the flattened gradient of their sum over `response_mask` (the model's grads zeroed first)."""
    from modules.forward import response_logprobs

    model.zero_grad()
    logp = response_logprobs(model, ids, mask, 5, 0.7, **kwargs)
    (logp * response_mask).sum().backward()
    return logp.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def derived_config(source: str, tmp_path: Path, override: dict, name: str = "config.yaml") -> str:
    """Write `source` deep-merged with `override` to tmp_path/name; returns the path."""
    return derive_config(source, override, tmp_path / name)


def tiny_rl_config(tmp_path: Path, sft_dir: str, source: str = "configs/quickstart/p3o.yaml", name: str = "rl.yaml",
                   extra_callbacks: list | None = None, checkpoint: dict | None = None, model: dict | None = None,
                   evaluation: dict | None = None, **trainer) -> str:
    """The quickstart RL config shrunk to seconds: a tiny SFT export, the gold reward, 16 prompts.
    `checkpoint` updates the StepCheckpoint's init_args, `evaluation` the Evaluation's; `model` is deep-merged into
    model.init_args."""
    config = yaml.safe_load(Path(source).read_text())
    callbacks = [cb for cb in config["trainer"]["callbacks"] if not cb["class_path"].endswith("HFExport")]
    callbacks += extra_callbacks or []
    for cb in callbacks:
        if cb["class_path"].endswith("Evaluation"):
            cb["init_args"].update({"num_prompts": 8, "every_n_batches": None, "show": 0, **(evaluation or {})})
        if cb["class_path"].endswith("StepCheckpoint"):
            cb["init_args"].update(checkpoint or {})
    override = {
        "trainer": {"max_steps": -1, "max_epochs": 1, "callbacks": callbacks, "log_every_n_steps": 1,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": {"init_args": {"save_dir": str(tmp_path / "runs")}}, **trainer},
        "model": {"init_args": merge_config({"policy": {"pretrained": sft_dir},
                                             "reward": {"class_path": "datamodules.task.GoldReward"},
                                             "sampling": {"max_new_tokens": 8}, "epochs": 2, "minibatch_groups": 2},
                                            model or {})},
        "data": {"init_args": {"tokenizer": sft_dir, "batch_size": 4,
                               "source": {"init_args": {"num_train": 16, "num_val": 8,
                                                        "cache_dir": str(tmp_path / "tok")}}}},
    }
    return derived_config(source, tmp_path, override, name)


def tiny_stage_config(tmp_path: Path, stage: str, sft_dir: str, name: str, extra_callbacks: list | None = None,
                      checkpoint: dict | None = None, **trainer) -> str:
    """The quickstart SFT or reward config ('sft' / 'reward') shrunk to seconds: a tiny model, 32 records in
    batches of 4, no export/evaluation callbacks. `checkpoint` updates the StepCheckpoint's init_args."""
    from tests.conftest import TINY

    source = f"configs/quickstart/{stage}.yaml"
    config = yaml.safe_load(Path(source).read_text())
    callbacks = [cb for cb in config["trainer"]["callbacks"] if cb["class_path"].endswith("StepCheckpoint")]
    callbacks[0]["init_args"].update(checkpoint or {})
    model = ({"backbone": {"config": dict(TINY)}} if stage == "sft" else
             {"backbone": {"pretrained": sft_dir}, "calibration_prompts": 4})
    override = {
        "trainer": {"max_steps": -1, "max_epochs": 1, "callbacks": callbacks + (extra_callbacks or []),
                    "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": {"init_args": {"save_dir": str(tmp_path / "runs")}}, **trainer},
        "model": {"init_args": model},
        "data": {"init_args": {"batch_size": 4, "tokenizer": sft_dir,
                               "source": {"init_args": {"num_train": 32, "num_val": 8,
                                                        "cache_dir": str(tmp_path / "tok")}}}},
    }
    return derived_config(source, tmp_path, override, name)


class ParamDigest(L.Callback):
    """Test callback: each rank saves its module's flattened trainable parameters, the prompts it trained on, the
    last evaluation's metrics (`callbacks.evaluation.Evaluation`; rank 0 only, None without one), whether each
    model a reward or judge holds (`modules.rewards.FrozenModel`) is sharded, and the RL objective's buffers."""

    def __init__(self, path: str):
        self.path, self.prompts, self.initial = path, [], None

    def on_train_start(self, trainer, pl_module):
        self.initial = self._flat(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.prompts += list(batch.prompts)

    def on_fit_end(self, trainer, pl_module):
        flat = self._flat(pl_module)
        from modules.rewards import FrozenModel, qualified_name
        from modules.sharding import fsdp_units

        evaluation = next((cb.history[-1] for cb in trainer.callbacks if getattr(cb, "history", None)), None)
        frozen = [m for m in [*pl_module.modules(), *(getattr(cb, "judge", None) for cb in trainer.callbacks)]
                  if isinstance(m, FrozenModel)]                   # the reward's and the judge's own models
        sharded = {qualified_name(m): bool(fsdp_units(m.model)) for m in frozen}
        objective = getattr(pl_module, "objective", None)                # its running statistics (RL)
        buffers = {} if objective is None else {name: b.clone() for name, b in objective.named_buffers()}
        torch.save({"params": flat, "initial": self.initial, "prompts": self.prompts, "evaluation": evaluation,
                    "sharded": sharded, "buffers": buffers},
                   f"{self.path}.rank{trainer.global_rank}.pt")


    @staticmethod
    def _flat(pl_module) -> torch.Tensor:
        # FSDP2: each rank gathers the whole parameters (every rank calls this). On the CPU: on a GPU, Lightning's
        # single-device teardown has moved the module there before `on_fit_end`, where `on_train_start` saw CUDA.
        whole = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in pl_module.parameters() if p.requires_grad]
        return torch.cat([p.detach().flatten().cpu() for p in whole])


class BadReward:
    """Test reward: the gold reward broken on purpose. mode 'nan' / 'inf': response 1 scores NaN / +inf;
    'extra': one value too many; 'short': one too few."""

    def __init__(self, mode: str = "nan"):
        self.mode = mode

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        from datamodules.task import GoldReward

        values = GoldReward()(prompts, responses)
        if self.mode in ("nan", "inf"):
            values[1] = float(self.mode)
        return values + [0.0] if self.mode == "extra" else values[:-1] if self.mode == "short" else values


SEEN_STATES: list = []


def progress_reward(completions, trainer_state, **kwargs):
    """Test reward written for TRL that shapes by progress: records where it was called (training: a rollout's
    responses: 8 in `tiny_rl_config`; the evaluation's: its prompts, fewer) and the `trainer_state` it got; scores 0."""
    where = "training" if len(completions) == 8 else "evaluation"
    SEEN_STATES.append((where, trainer_state.global_step, trainer_state.max_steps, trainer_state.epoch))
    return [0.0] * len(completions)


class ShortOnRank:
    """Test reward: 0 for every response, but one number too few on the process of global rank `rank` (under DDP: a
    reward error on one process only, as a bad record in one process's batch gives)."""

    def __init__(self, rank: int = 0):
        self.rank = rank

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        import torch.distributed as dist

        short = dist.is_initialized() and dist.get_rank() == self.rank
        return [0.0] * (len(responses) - short)


def logging_reward(completions, log_metric, **kwargs):
    """Test reward written for TRL that logs a metric (TRL's `log_metric`): `calls`, 1 per call; `rank`, this process's
    rank (0 alone); and, on rank 1 only, `only_rank1` (a name one process never logs). Scores 0."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    log_metric("calls", 1.0)
    log_metric("rank", float(rank))
    if rank == 1:
        log_metric("only_rank1", 7.0)
    return [0.0] * len(completions)


class ScoreTable:
    """Test pairwise reward: f(a, b) = scores[a] - scores[b] + bias from a dict, recording every call; antisymmetric
    (asked once per pair) unless it has a bias. `broken`: 'count' returns one number, 'nan' NaN for pairs with a = 'y'."""

    pairwise = True

    def __init__(self, scores: dict, broken: str | None = None, bias: float = 0.0):
        self.scores, self.broken, self.bias, self.calls = scores, broken, bias, []
        self.antisymmetric = bias == 0.0

    def __call__(self, prompts: list[str], a: list[str], b: list[str]) -> list[float]:
        self.calls.append((list(prompts), list(a), list(b)))
        if self.broken == "count":
            return [0.0]
        return [float("nan") if self.broken == "nan" and x == "y" else self.scores[x] - self.scores[y] + self.bias
                for x, y in zip(a, b)]


class FirstPositionJudge:
    """Test pairwise reward: a judge that favours whatever it reads first, f(a, b) = r(a) - r(b) + bias with r the
    gold reward. It does not declare itself antisymmetric, so the RL module asks it in both orders."""

    pairwise = True

    def __init__(self, bias: float = 3.0):
        self.bias = bias

    def __call__(self, prompts: list[str], responses_a: list[str], responses_b: list[str]) -> list[float]:
        from datamodules.task import GoldReward

        gold = GoldReward()
        a, b = gold(prompts, responses_a), gold(prompts, responses_b)
        return [x - y + self.bias for x, y in zip(a, b)]


class BrokenReward:
    """Test reward whose constructor fails with a bug, not a complaint about its settings."""

    def __init__(self):
        raise RuntimeError("BrokenReward: a bug in its constructor")

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [0.0] * len(responses)


class BreakAfter(L.Callback):
    """Test callback: from training batch `at` on, the objective's loss is NaN ('loss') or finite with NaN
    gradients ('grad')."""

    def __init__(self, at: int, mode: str = "loss"):
        self.at, self.mode = at, mode

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.fit_loop.total_batch_idx < self.at or getattr(pl_module.objective, "_broken", False):
            return
        objective, forward, mode = pl_module.objective, pl_module.objective.forward, self.mode

        def broken(inputs):
            out = forward(inputs)
            if mode == "loss":
                out.loss = out.loss * float("nan")
            else:  # value unchanged, gradient NaN: d/dx sqrt(-x) at x > 0
                x = inputs.logp.sum().abs() + 1
                out.loss = out.loss + torch.where(torch.tensor(False), torch.sqrt(-x), torch.zeros(()))
            return out

        objective.forward, objective._broken = broken, True


class KillAt(L.Callback):
    """Test callback: sends `signal` to its own process when training batch `at` (counted over the run) starts."""

    def __init__(self, at: int, signal: str = "SIGKILL"):
        self.at, self.signal = at, signal

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        import os
        import signal

        if trainer.fit_loop.total_batch_idx == self.at:
            os.kill(os.getpid(), getattr(signal, self.signal))


class GatheredFrozen(L.Callback):
    """Test callback: on rank 0, appends to `path` one JSON line per save: the frozen parameters (a tied one under
    its first name) in the checkpoint's state dict as the strategy made it, before the module's own hook leaves
    them out (`modules.checkpoints`)."""

    def __init__(self, path: str):
        self.path = path

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        import json

        from modules.checkpoints import is_frozen

        if trainer.is_global_zero:
            frozen = {name for name, p in pl_module.named_parameters() if not p.requires_grad}
            keys = sorted(k for k in checkpoint.get("state_dict", {}) if is_frozen(k, frozen))
            with open(self.path, "a") as out:
                out.write(json.dumps(keys) + "\n")


class RecordRollouts(L.Callback):
    """Records each rollout's (prompt, response, training reward, {}) rows, after OnPolicyRollout made it."""

    seen: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        roll = pl_module.rollout
        type(self).seen.append(list(zip(roll.prompts, roll.responses, roll.rewards.tolist(), [{}] * len(roll))))


class RecordingCheckpoint(L.Callback):
    """Test callback: records after which batches a StepCheckpoint of the same trainer saved."""

    def __init__(self):
        self.saves = []

    def on_train_start(self, trainer, pl_module):
        from callbacks.checkpoint import StepCheckpoint

        ckpt = next(cb for cb in trainer.callbacks if isinstance(cb, StepCheckpoint))
        save = ckpt.save

        def recording(trainer):
            save(trainer)
            self.saves.append(ckpt.batches)

        ckpt.save = recording


class ShiftedSampler(Sampler):
    """Our sampler standing in for an engine whose logprobs are not the trainer's (`exact = False`): it reports
    every sampled token's logprob plus `shift` (0: the trainer's own, up to float rounding; 4: a stale layer)."""

    exact = False

    def __init__(self, shift: float = 0.0, max_logprob_diff: float | None = 1.0,
                 correction: MismatchCorrection | None = None):
        super().__init__(max_logprob_diff, correction)
        self.shift, self.calls = shift, 0

    def generate(self, *args, **kwargs):
        self.calls += 1
        roll = super().generate(*args, **kwargs)
        if roll.old_logp is not None:
            roll.old_logp = (roll.old_logp + self.shift) * roll.response_mask
        return roll


# A Hermes-style chat template (the tool format of Qwen2.5 / Qwen3): SmolLM2's own template ignores `tools`.
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nYou may call these tools:\n<tools>\n{% for tool in tools %}"
    "{{ tool | tojson }}\n{% endfor %}</tools>\nCall one as <tool_call>{\"name\": ..., \"arguments\": {...}}"
    "</tool_call><|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n{{ message.content }}"
    "{% for call in message.tool_calls %}<tool_call>{\"name\": \"{{ call.function.name }}\", \"arguments\": "
    "{{ call.function.arguments | tojson }}}</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif message.role == 'tool' %}<|im_start|>user\n<tool_response>{{ message.content }}</tool_response>"
    "<|im_end|>\n"
    "{% else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first.
        b: the second.
    """
    return a + b


class ScriptedFirstTurn:
    """A test engine's first turns: every even response's is a call of `add` (2 + 3), every odd one's the answer "5";
    later turns are the engine's own (the next base class). The scripted turns' recorded logprobs are 0, not the
    policy's (`exact = False`: pi_old comes from a forward pass)."""

    exact = False
    CALL = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
    CALL_MESSAGE = {"role": "assistant", "content": "",        # (that turn in `Rollout.messages`, as TRL parses it)
                    "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]}
    only_rank: int | None = None       # in a distributed run, only this rank's responses call (ranks then differ)

    def generate(self, model, tokenizer, prompt_ids, prompt_mask, prompts, config, num_samples=1,
                 record_logprobs=False, share_prompts=True, same_weights=False):
        from datamodules.collate import pad
        from modules.sampling import rollout_of

        if same_weights:
            return super().generate(model, tokenizer, prompt_ids, prompt_mask, prompts, config, num_samples,
                                    record_logprobs, share_prompts, same_weights)
        import torch.distributed as dist

        calls = self.only_rank is None or not dist.is_initialized() or dist.get_rank() == self.only_rank
        rows = [tokenizer(self.CALL if calls and i % 2 == 0 else "5", add_special_tokens=False)["input_ids"]
                + [tokenizer.eos_token_id] for i in range(len(prompt_ids) * num_samples)]
        response = pad(rows, tokenizer.pad_token_id, "right")[0].to(prompt_ids.device)
        return rollout_of(prompt_ids.repeat_interleave(num_samples, 0), prompt_mask.repeat_interleave(num_samples, 0),
                          response, prompts, num_samples, tokenizer,
                          torch.zeros(response.shape, device=response.device) if record_logprobs else None)


def with_template(tokenizer, template: str):
    """A copy of `tokenizer` whose chat template is `template` (the original is left as it is)."""
    import copy

    other = copy.deepcopy(tokenizer)
    other.chat_template = template
    return other


def family_tokenizer(tokenizer, template: str, specials: list[str], eos: str | None = None, bos: str | None = None,
                     stops: list[str] = ()):
    """A copy of `tokenizer` standing in for a model family's (its vocabulary aside): its chat `template`, its special
    tokens `specials`, its EOS and BOS where given, and `stops` as the EOS ids of its generation config (as
    `modules.backbone.load_tokenizer` keeps them, `generation_eos_ids`).

    Example: gpt-oss's, with EOS "<|return|>" and stops ["<|return|>", "<|endoftext|>", "<|call|>"]."""
    other = with_template(tokenizer, template)
    other.add_special_tokens({**({"eos_token": eos} if eos else {}), **({"bos_token": bos} if bos else {}),
                              "additional_special_tokens": list(specials)})
    if stops:
        other.generation_eos_ids = other.convert_tokens_to_ids(list(stops))
    return other


class RecordsContexts:
    """A test engine mixin: records in its class's `contexts` the decoded context of each later turn (`same_weights`)
    it generates (the tool results' and user messages' renderings included), then generates as its next base does."""

    contexts: list[str] = []

    def generate(self, model, tokenizer, prompt_ids, prompt_mask, prompts, config, num_samples=1, **kwargs):
        if kwargs.get("same_weights"):
            type(self).contexts += [tokenizer.decode(row[m.bool()]) for row, m in zip(prompt_ids, prompt_mask)]
        return super().generate(model, tokenizer, prompt_ids, prompt_mask, prompts, config, num_samples, **kwargs)


class ScriptedToolCalls(ScriptedFirstTurn, Sampler):
    """`ScriptedFirstTurn`, then our sampler."""


class RankZeroToolCalls(ScriptedToolCalls):
    """`ScriptedToolCalls` where only rank 0's responses call: rank 0 runs two turns per rollout, rank 1 one."""

    only_rank = 0


class Counter:
    """A stateful environment: `add` sums onto the record's `base` and counts its calls; the reward is whether it
    was called. Its reset tells the policy where it starts."""

    built = 0

    def __init__(self):
        Counter.built += 1
        self.base, self.calls = 0, 0

    def reset(self, base: int = 0) -> str:
        self.base, self.calls = int(base), 0
        return f" Start from {base}."

    def add(self, a: int, b: int) -> int:
        """Add two numbers to the start.

        Args:
            a: the first number.
            b: the second number.
        """
        self.calls += 1
        return self.base + a + b

    def get_reward(self) -> float:
        return float(self.calls > 0)


class Episode(Counter):
    """`Counter` as an environment that writes each prompt (`datamodules.sources.Episodes`): reset draws the base
    from the episode number and returns the whole task."""

    def reset(self, episode: int) -> str:
        self.base, self.calls = episode_base(episode), 0
        return f"What is 2 + 3, from {self.base}?"


def episode_base(episode: int) -> int:
    return random.Random(episode).randrange(100)

    def _helper(self) -> None:            # (private: not a tool)
        pass


def first_trace_call(task, tools, **data) -> tuple[dict, object, str]:
    """A calculator-style task's SFT data with `tools` (chosen only, its prompts `tools add :` first): (its first
    tool-use trace example, the tokenizer, the text of that trace's call turn, decoded as a rollout decodes it)."""
    from datamodules.pairs import PairDataModule

    data = PairDataModule(task, chosen_only=True, tools=tools, max_prompt_length=10, **data)
    data.setup("fit")
    example = next(e for e in data.splits["train"] if isinstance(e["chosen"], list))
    tok = data.tokenizer
    assert tok.decode(example["prompt_ids"]).startswith("tools add :")
    call = example["chosen_ids"][:example["chosen_own"].index(0)]
    return example, tok, tok.decode(call[:-1], skip_special_tokens=False)     # (the call turn, its EOS dropped)


def in_threads(fn, world: int = 2) -> list:
    """`fn(rank, sum_over)` for each of `world` ranks, each in its own thread at once; `sum_over(tensor)` is an
    all-reduce among them: every rank gets the sum of the tensors all ranks passed at the same call (in rank order,
    so each gets the same bits). Returns each rank's result; a rank's exception is raised, and a rank that never
    reaches a call fails the others after 30 s (`threading.BrokenBarrierError`), not a hang."""
    import threading

    barrier, slots, results, errors = threading.Barrier(world, timeout=30), [None] * world, [None] * world, []

    def sum_over(rank):
        def reduce(tensor):
            slots[rank] = tensor.clone()
            barrier.wait()
            total = slots[0].clone()
            for other in slots[1:]:
                total += other
            barrier.wait()                            # every rank has read the slots before the next call
            return total
        return reduce

    def run(rank):
        try:
            results[rank] = fn(rank, sum_over(rank))
        except BaseException as error:  # noqa: BLE001 (raised in the caller)
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def by_vocabulary(monkeypatch, on: bool = True) -> None:
    """The chunked head's 16-bit backward (`_backward_by_vocab`: by slices of the vocabulary, log p from the
    forward's log Z) made to run in float32 too, so its maths is checked to float32 rounding."""
    from modules import functional as F

    if on:
        monkeypatch.setattr(F._ChunkedLinearLogprobs, "_by_vocab", staticmethod(lambda dtype: True))

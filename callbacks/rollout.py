"""OnPolicyRollout: decides when to sample and owns the rollout buffer and its random state.

Before every training step it asks the RL module for a fresh rollout of the step's prompt batch
(`RLModule.make_rollout`: K responses per prompt, EOS truncation, rewards, pi_old and pi_ref logprobs) and hands
it to the module. Sampling draws from a random stream owned by this callback and saved in checkpoints
(`state_dict` / `load_state_dict`), so a resumed run samples exactly what an uninterrupted run would have,
whatever else (evaluation, dropout) used the global generator in between. Under DDP every rank samples from its
own stream; a checkpoint (written by rank 0) holds all of them, and each rank resumes with its own.
"""
from __future__ import annotations

import contextlib

import lightning as L
import torch

from callbacks.evaluation import batches_done, samples_table
from callbacks.sharding import outside_forward


class OnPolicyRollout(L.Callback):
    """Samples a fresh rollout before every RL training step, from its own checkpointed random stream.

    Args:
        seed: seeds the sampling stream (each rank draws from seed * 1000 + rank).
        log_samples: the first this many responses of a rollout (the K responses to each of its first prompts, in
            order) with their training rewards and the columns the reward logged for them (TRL's `log_extra`),
            written to the logger as a text table, `train/samples` (TRL's `log_completions`; rank 0's rollout).
            0: none.
        log_every_n_rollouts: write them for every n-th rollout, the first included.
    """

    def __init__(self, seed: int = 0, log_samples: int = 0, log_every_n_rollouts: int = 1):
        if log_samples < 0 or log_every_n_rollouts < 1:
            raise ValueError(f"OnPolicyRollout: log_samples={log_samples}, log_every_n_rollouts={log_every_n_rollouts}; "
                             "expected log_samples >= 0 and log_every_n_rollouts >= 1")
        self.seed, self.log_samples, self.log_every = seed, log_samples, log_every_n_rollouts
        self.rng_state: dict | None = None
        self.rollouts = 0
        self.samples = 0
        self.rank, self.world_size = 0, 1

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        self.rank, self.world_size = trainer.global_rank, trainer.world_size

    @contextlib.contextmanager
    def _own_rng(self, device: torch.device, rank: int):
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            if self.rng_state is None:
                torch.manual_seed(self.seed * 1000 + rank)
            else:
                torch.set_rng_state(self.rng_state["cpu"])
                if devices and self.rng_state.get("cuda") is not None:
                    torch.cuda.set_rng_state(self.rng_state["cuda"], device)
            yield
            self.rng_state = {"cpu": torch.get_rng_state(),
                              "cuda": torch.cuda.get_rng_state(device) if devices else None}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        with self._own_rng(pl_module.device, trainer.global_rank), outside_forward(trainer):
            pl_module.rollout = pl_module.make_rollout(batch)
        if self.log_samples and self.rollouts % self.log_every == 0 and trainer.is_global_zero:
            self._log_samples(trainer, pl_module.rollout)
        self.rollouts += 1
        self.samples += len(pl_module.rollout)

    def _log_samples(self, trainer: L.Trainer, roll) -> None:
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_text"):
            return
        rows = [(p, r, float(v), {name: values[i] for name, values in roll.extras.items()})
                for i, (p, r, v) in enumerate(zip(roll.prompts, roll.responses, roll.rewards.tolist()))]
        experiment.add_text("train/samples", samples_table(rows[: self.log_samples]), batches_done(trainer))

    def state_dict(self) -> dict:
        """Called on every rank when a checkpoint is written: gathers each rank's random stream."""
        states = [self.rng_state]
        if self.world_size > 1:
            import torch.distributed as dist

            states = [None] * self.world_size
            dist.all_gather_object(states, self.rng_state)
        return {"rng_states": states, "rollouts": self.rollouts, "samples": self.samples, "seed": self.seed}

    def load_state_dict(self, state_dict: dict) -> None:
        states = state_dict["rng_states"]
        if len(states) != self.world_size:
            raise ValueError(f"OnPolicyRollout: the checkpoint holds the sampling streams of {len(states)} ranks, this "
                             f"run has {self.world_size}; resume with the same number of processes")
        self.rng_state, self.rollouts = states[self.rank], state_dict["rollouts"]
        self.samples, self.seed = state_dict["samples"], state_dict["seed"]

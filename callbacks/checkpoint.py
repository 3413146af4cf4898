"""StepCheckpoint: a checkpoint on a cadence of training batches that always fires, and on Ctrl-C.

One training batch is one optimizer step in the SFT and reward stages and one whole rollout (sampling plus every
epoch of minibatch updates) in RL, where `global_step` counts optimizer steps and so a `global_step` cadence
(`ModelCheckpoint(every_n_train_steps=...)`) can miss every time. This counts batches instead. It keeps one
file, `<dirpath>/last.ckpt` (default dirpath: `<the logger's run dir>/checkpoints`), written atomically (a
temporary file renamed over the old one), so a kill at any moment leaves the previous good checkpoint.
Resume with `--ckpt_path <dirpath>/last.ckpt`: the prompt loader,
the rollout sampler's random stream, optimizer and objective state all continue where they stopped.

With `on_interrupt` (default), the first SIGINT (Ctrl-C) or SIGTERM lets the current batch finish, saves, and
stops training (a second Ctrl-C interrupts at once). Under DDP the ranks agree on stopping after each batch. An
interrupted run is not a finished one: `interrupted` holds the signal, the export is not written, there is no final
evaluation, and `python train.py` exits with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM).

The final checkpoint is written before anything else runs at the end of training (`finish`, called by the
export and the evaluation callbacks first): an export or evaluation that fails at the end cannot lose the
batches trained since the last save.
"""
from __future__ import annotations

import os
import shutil
import signal

import lightning as L
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_info


class StepCheckpoint(Checkpoint):
    """Writes `last.ckpt` every few training batches, at the end and on Ctrl-C / SIGTERM; a resume continues exactly.

    Args:
        dirpath: where `last.ckpt` is written (None: `checkpoints/` in the run's log dir, like ModelCheckpoint).
        every_n_batches: save after every this many training batches (rollouts in RL); 0 = only at the end and on
            interrupt.
        on_interrupt: turn SIGINT / SIGTERM into "finish this batch, save, stop".
    """

    def __init__(self, dirpath: str | None = None, every_n_batches: int = 10, on_interrupt: bool = True):
        if every_n_batches < 0:
            raise ValueError(f"StepCheckpoint: every_n_batches must be >= 0, got {every_n_batches}")
        self.dirpath, self.every_n_batches, self.on_interrupt = dirpath, every_n_batches, on_interrupt
        self.batches = 0
        self.saved_at: int | None = None
        self.resumed_at: int | None = None      # batches done in the checkpoint this run resumed from
        self.interrupted: int | None = None     # the signal that stopped training early
        self._signal: int | None = None
        self._previous_handlers: dict = {}

    @property
    def last_path(self) -> str:
        return os.path.join(self.dirpath, "last.ckpt")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.on_interrupt:
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._previous_handlers[sig] = signal.signal(sig, self._request_stop)
                except ValueError:  # not the main thread: leave signals alone
                    pass

    def _request_stop(self, signum, frame) -> None:
        if self._signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt   # second Ctrl-C: stop now
        self._signal = signum
        rank_zero_info(f"\n{signal.Signals(signum).name}: finishing the current batch, then saving {self.last_path} "
                       "and stopping (Ctrl-C again to stop at once)")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.batches += 1
        stop = self.on_interrupt and trainer.strategy.reduce_boolean_decision(self._signal is not None, all=False)
        if stop or (self.every_n_batches and self.batches % self.every_n_batches == 0):
            self.save(trainer)
        if stop:
            self.interrupted = _agreed_signal(trainer, self._signal)
            trainer.should_stop = True
            rank_zero_info(f"{signal.Signals(self.interrupted).name}: stopped after batch {self.batches}, saved "
                           f"{self.last_path}; resume with --ckpt_path {self.last_path}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.finish(trainer)
        self._restore_handlers()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.finish(trainer)    # a resumed run that was already complete skips the train hooks altogether

    def finish(self, trainer: L.Trainer) -> None:
        """The final save, once, before any other end-of-training work; says so when the run resumed from a
        checkpoint that was already complete (nothing was trained)."""
        if self.saved_at != self.batches:
            self.save(trainer)
        if self.resumed_at is not None and self.resumed_at == self.batches:
            rank_zero_info(f"the run in the checkpoint is already complete ({self.batches} training batches); this "
                           "run's limits leave nothing to train, so nothing was trained")
            self.resumed_at = None   # said once

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        if self.saved_at is not None:
            rank_zero_info(f"the last good checkpoint is {self.last_path} (after batch {self.saved_at}); "
                           f"resume with --ckpt_path {self.last_path}")

    def save(self, trainer: L.Trainer) -> None:
        """Write last.ckpt atomically: every rank enters (sharded strategies gather), rank 0 renames."""
        self.saved_at = self.batches
        partial = self.last_path + ".partial"
        trainer.save_checkpoint(partial, weights_only=False)   # full state: optimizer, loops, callbacks
        if trainer.is_global_zero:
            if os.path.isdir(partial):                 # DeepSpeed writes a directory: replace it whole
                shutil.rmtree(self.last_path, ignore_errors=True)
            os.replace(partial, self.last_path)
        trainer.strategy.barrier("step_checkpoint")

    def _restore_handlers(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers, self._signal = {}, None

    def state_dict(self) -> dict:
        return {"batches": self.batches}

    def load_state_dict(self, state_dict: dict) -> None:
        self.batches = state_dict["batches"]
        self.saved_at = self.resumed_at = self.batches


def _agreed_signal(trainer: L.Trainer, local: int | None) -> int:
    """The signal that stopped training, the same on every rank (the highest number any rank received)."""
    import torch

    received = torch.tensor(float(local or 0), device=trainer.strategy.root_device)
    if trainer.world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(received, op=dist.ReduceOp.MAX)
    return int(received.item()) or signal.SIGTERM


def step_checkpoints(trainer: L.Trainer) -> list[StepCheckpoint]:
    return [cb for cb in trainer.callbacks if isinstance(cb, StepCheckpoint)]


def finish_checkpoints(trainer: L.Trainer) -> None:
    """Write every StepCheckpoint's final checkpoint now (end-of-training callbacks call this first)."""
    for callback in step_checkpoints(trainer):
        callback.finish(trainer)


def interrupted(trainer: L.Trainer) -> int | None:
    """The signal that stopped this run's training early (SIGINT / SIGTERM through a StepCheckpoint), or None."""
    return next((cb.interrupted for cb in step_checkpoints(trainer) if cb.interrupted), None)


def saved_checkpoint(trainer: L.Trainer) -> str | None:
    """The path of this run's last saved checkpoint (written before the export), if a StepCheckpoint saved one."""
    return next((cb.last_path for cb in step_checkpoints(trainer) if cb.saved_at is not None), None)

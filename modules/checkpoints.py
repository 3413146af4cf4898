"""What a training checkpoint holds: the weights training changes, not the frozen ones.

Every stage module derives from `TrainedOnlyCheckpoints`. A run's frozen weights (a full fine-tune's reference
copy, a LoRA model's base, an RL run's reward model or judge) are rebuilt from its config on resume, exactly as
they were built at the start, so its checkpoints leave them out: a LoRA run's checkpoint holds the adapters and
their optimizer state, not the base; a full fine-tune's holds the policy, not its reference. In their place it
records a digest of each frozen parameter (`frozen_digest`: its sum and its L2 norm, in float64; computed once per
run: about 0.6 s for SmolLM2-135M's shape twice over on 2 CPU cores, `benchmarks/checkpoint.py`). A resume whose
frozen weights differ from the checkpoint's (another SFT export, another reward model) stops before training with
one line naming the first parameter that differs, instead of silently training against other weights.

Under FSDP2 the frozen weights are not gathered to the first rank either (`modules.sharding.FSDP2Strategy`).
A checkpoint written before this (with the frozen weights in it) still resumes. DeepSpeed writes its checkpoints
through its own engine, frozen weights included.
"""
from __future__ import annotations

import math

import torch

from modules.checks import ConfigError, import_class

DIGEST = "frozen_digest"     # checkpoint keys: {parameter name: (sum, L2 norm)} and the names of the saved entries
TRAINED = "trained_keys"
DIGEST_BEFORE_CAST = "_digest_before_cast"   # a parameter's attribute: the (sum, sum of squares) of what it was cast from


class TrainedOnlyCheckpoints:
    """LightningModule hooks: checkpoints without the frozen parameters, checked against them on resume."""

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        from torch.distributed.tensor import DTensor

        frozen = frozen_names(self)
        state = checkpoint.get("state_dict")
        if state is not None and any(isinstance(v, DTensor) for v in state.values()):
            state = None            # a distributed (sharded) checkpoint keeps them: its loader asks for every key
        for key in [k for k in state if is_frozen(k, frozen)] if state is not None else ():
            del state[key]
        checkpoint[TRAINED] = trained_keys(self, frozen)
        if getattr(self, "_frozen_digest", None) is None:       # frozen weights do not change: once per run
            self._frozen_digest = frozen_digest(self)
        checkpoint[DIGEST] = self._frozen_digest

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Before the weights load (one device, DDP): the frozen entries are filled from this run's own, so the
        strict load sees every key. The saved entries must be this run's trained ones, and the frozen weights
        must match the checkpoint's digest: otherwise a `ConfigError` naming the first difference."""
        saved = checkpoint.get(TRAINED)
        if saved is None:                     # written before frozen weights were left out: nothing to check
            return
        frozen = frozen_names(self)
        ours = trained_keys(self, frozen)
        if saved != ours:
            extra, missing = sorted(set(saved) - set(ours)), sorted(set(ours) - set(saved))
            raise ConfigError(f"the checkpoint's trained weights are not this run's: {len(missing)} missing (first: "
                              f"{missing[:1]}), {len(extra)} not in this run (first: {extra[:1]}); resume with the "
                              "config that wrote it (same model, LoRA settings, objective and ref_sync_steps)")
        theirs = checkpoint.get(DIGEST, {})
        mine = self._frozen_digest = frozen_digest(self)
        for name in sorted(set(theirs) | set(mine)):
            a, b = theirs.get(name), mine.get(name)
            if a is None or b is None or not all(math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12) for x, y in zip(a, b)):
                raise ConfigError(
                    f"the frozen weights differ from the checkpoint's at {name} (sum, norm: checkpoint {a}, this run "
                    f"{b}): the checkpoint leaves frozen weights out (a LoRA base, the reference, the reward model) "
                    "and this run rebuilt them from other files; resume with the models the checkpoint was written with")
        state = checkpoint.get("state_dict")
        if state is not None:
            own = self.state_dict()                # as a checkpoint with them would hold them
            for name in frozen:                     # (a 4-bit weight's quantization state is rebuilt with it)
                state.setdefault(name, own[name])


def frozen_names(module: torch.nn.Module) -> set[str]:
    """The state-dict names of `module`'s frozen parameters (every name of a tied one) that its checkpoints leave out:
    all, but those under the module's `checkpointed_frozen` prefixes (frozen weights that training moves: the RL
    module's reference with `ref_sync_steps`)."""
    kept = tuple(getattr(module, "checkpointed_frozen", ()))
    return {name for name, p in module.named_parameters(remove_duplicate=False)
            if not p.requires_grad and not (kept and name.startswith(kept))}


def trained_keys(module: torch.nn.Module, frozen: set[str]) -> list[str]:
    """The sorted state-dict entries a checkpoint of `module` holds: all but the frozen ones (`is_frozen`)."""
    return sorted(k for k in module.state_dict() if not is_frozen(k, frozen))


def is_frozen(key: str, frozen: set[str]) -> bool:
    """Whether a state-dict entry belongs to a frozen parameter: the parameter itself, or what a 4-bit weight
    saves beside it (`<name>.absmax`, `<name>.quant_map`, ...: bitsandbytes' quantization state, which a load of
    the module's own state dict does not take back).

    Example: frozen {'w'}: 'w' and 'w.absmax' are frozen entries, 'w2' is not."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in frozen for i in range(len(parts), 0, -1))


@torch.no_grad()
def frozen_digest(module: torch.nn.Module) -> dict[str, tuple[float, float]]:
    """{name: (sum, L2 norm)} of every frozen parameter a checkpoint leaves out (`frozen_names`; tied ones once), in
    float64; of a frozen linear that mixed precision stores in 16 bits (`modules.backbone.linears_in`), its fp32
    weights' before the cast, so a checkpoint resumes under another precision and one written before that cast
    resumes after it. A parameter sharded by FSDP2
    contributes each rank's shard (every rank calls this; one all-reduce); one whole on every rank counts once.

    Example: a frozen parameter [[1, 2], [2, 0]] -> (5.0, 3.0) (sum 5; sqrt(1 + 4 + 4) = 3)."""
    from torch.distributed.tensor import DTensor

    names, sums, shared = [], [], []
    left_out = frozen_names(module)
    for name, p in module.named_parameters():
        if name not in left_out:
            continue
        local = p.to_local() if isinstance(p, DTensor) else p
        names.append(name)
        before = getattr(p, DIGEST_BEFORE_CAST, None)      # (a frozen linear stored in 16 bits: its fp32 source's)
        sums.append(before if before is not None else _sum_and_squares(local))
        shared.append(isinstance(p, DTensor))
    if not names:
        return {}
    table = torch.stack(sums)                                                         # (P, 2): sum, sum of squares
    if any(shared):
        import torch.distributed as dist

        device = next(p for p in module.parameters() if isinstance(p, DTensor)).to_local().device
        parts = table.to(device) * torch.tensor(shared, device=device).unsqueeze(1)  # shards add up over ranks
        dist.all_reduce(parts)
        table = torch.where(torch.tensor(shared).unsqueeze(1), parts.cpu(), table)
    return {name: (float(s), math.sqrt(float(q))) for name, (s, q) in zip(names, table.tolist())}


def keep_digest(param: torch.nn.Parameter) -> None:
    """Record `param`'s digest as it is now, for `frozen_digest` to use after the parameter is cast in place (a frozen
    linear that mixed precision stores in 16 bits: `modules.backbone.linears_in`)."""
    setattr(param, DIGEST_BEFORE_CAST, _sum_and_squares(param))


def _sum_and_squares(tensor: torch.Tensor) -> torch.Tensor:
    """(sum, sum of squares) in float64 (on the CPU), 4M values at a time: no float64 copy of a whole tensor."""
    total = torch.zeros(2, dtype=torch.float64, device=tensor.device)
    for part in tensor.detach().reshape(-1).split(1 << 22):
        part = part.double()
        total += torch.stack([part.sum(), part.square().sum()])
    return total.cpu()


def saved_settings(path: str) -> dict:
    """The settings a stage's checkpoint records: LightningCLI's `_class_path` and the module's init arguments as
    they were given (`hyper_parameters`), read without loading its tensors where the file allows (memory-mapped)."""
    try:
        checkpoint = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except RuntimeError:                # written in torch's old (not zip) format: no memory map
        checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    return dict(checkpoint.get("hyper_parameters") or {})


def _flat(node, prefix: str = "") -> dict:
    """{dotted key: value} of nested dicts; a list is one value (tuples as lists, as YAML and the checkpoint have them)."""
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: list(node) if isinstance(node, tuple) else node}


def _same_class(a: str, b: str) -> bool:
    """Whether two class paths name one class (a renamed module's alias included: `modules.reward.RewardModule`)."""
    import warnings

    if a == b:
        return True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)         # the alias's notice
        first, second = import_class(a), import_class(b)
    return first is not None and first is second


def resume_check(path: str, model: dict, linked: tuple[str, ...] = ("tokenizer",)) -> tuple[str | None, list[str]]:
    """Resuming from the checkpoint at `path` with the config's `model` block (`{class_path, init_args}`): (a line that
    stops the run, when the checkpoint is of another stage; the settings of this run that differ from those of the
    run that wrote it, as `model.init_args.<field>: <theirs> -> <this run's>`). `linked`: fields the config fills
    only when it builds the model (not compared)."""
    saved = saved_settings(path)
    theirs, ours = saved.pop("_class_path", None), model.get("class_path")
    saved.pop("_instantiator", None)
    if theirs and ours and not _same_class(theirs, ours):
        return (f"--ckpt_path {path}: a checkpoint of {theirs}; this config trains {ours}: use the config that wrote it, "
                "or a checkpoint of this stage"), []
    given = _flat(model.get("init_args") or {})
    return None, [f"model.init_args.{key}: {value!r} -> {given[key]!r}" for key, value in _flat(saved).items()
                  if key in given and key.split(".")[0] not in linked and value != given[key]]

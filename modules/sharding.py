"""The one place for sharded models: FSDP2 (`torch.distributed.fsdp.fully_shard`), run by `FSDP2Strategy`, Lightning's
`ModelParallelStrategy` with every process in the data-parallel dimension (`configs/presets/fsdp.yaml` on GPUs,
`fsdp_cpu.yaml` on 2 CPU processes with gloo).

Each stage shards its own models in `configure_model` (`shard`): every decoder layer is one FSDP unit, the rest of
the model (embeddings, final norm, LM or scalar head) the root unit. Frozen models (the reference, a reward
model) are sharded too. Gradients are averaged over the ranks, as under DDP.

What the rest of the code relies on:
  * The root keeps its parameters gathered after its forward (`reshard_after_forward=False`), so the LM head can
    be applied after the forward, chunk by chunk (`modules.forward`), and its gradient still reaches FSDP.
  * Every forward of a sharded model is a collective: all ranks make the same number of forwards
    (`RLModule.micro_batches` agrees on a count; evaluation gives every rank as many prompts).
  * Sampling runs inside `gathered`: all parameters gathered once, then generation makes no collective call, so
    ranks may stop at different lengths.
  * The export gathers whole weights on rank 0 (`full_state_dicts`) and writes a plain model rebuilt from them.
DeepSpeed ZeRO-3 (`is_partitioned`) gathers each submodule's parameters inside its own forward only.
"""
from __future__ import annotations

import contextlib
import copy

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from modules.checks import ConfigError


class ShardingError(ConfigError):
    """A configuration that the sharded path cannot run (`train.py` prints it as one line, before training)."""


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's `ModelParallelStrategy` as FSDP2 alone: every process in the data-parallel dimension (each
    rank its own share of the prompts), tensor parallel size 1, and checkpoints written as one file on rank 0
    (the whole weights and optimizer state; `--ckpt_path` resumes it exactly with the same number of processes,
    tested with 2).

    Args:
        save_distributed_checkpoint: write a folder with one shard per rank instead of one file (for models too
            large to gather on one rank; not tested here).
        process_group_backend: `nccl` on GPUs and `gloo` on CPU by default.
    """

    def __init__(self, save_distributed_checkpoint: bool = False, process_group_backend: str | None = None):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def fsdp_mesh(module) -> "torch.distributed.device_mesh.DeviceMesh | None":
    """The data-parallel mesh to shard over when Lightning's `ModelParallelStrategy` runs `module`; None under
    every other strategy. Tensor parallelism is not applied by any stage, so its size must be 1."""
    mesh = getattr(module, "_device_mesh", None)
    if mesh is None:
        return None
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ShardingError(f"ModelParallelStrategy: tensor_parallel_size={mesh['tensor_parallel'].size()}; the "
                            "stages shard with FSDP2 only: use modules.sharding.FSDP2Strategy (configs/presets/"
                            "fsdp.yaml), or data_parallel_size = the number of processes and tensor_parallel_size: 1")
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def shard(model: nn.Module, mesh) -> nn.Module:
    """FSDP2 over `mesh`: each decoder layer (the classes a transformers model lists in `_no_split_modules`) is
    one unit, then the whole model the root unit, which keeps its parameters gathered after its forward. Returns
    `model` (sharded in place); unchanged when `mesh` is None. LoRA works as is: FSDP2 shards each parameter on its
    own, so frozen and trainable ones share a unit."""
    if mesh is None:
        return model
    from torch.distributed.fsdp import fully_shard

    if any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules()):
        raise ShardingError("FSDP2 cannot shard 4-bit / 8-bit (bitsandbytes) weights: drop `quantization` from the "
                            "backbone, or train QLoRA on one device")
    layers = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or ())}
    units = [m for m in model.modules() if type(m).__name__ in layers]
    if not units:
        raise ShardingError(f"{type(model).__name__}: no decoder layer classes (`_no_split_modules`) to shard")
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    return model


def shard_with_frozen_copy(model: nn.Module, mesh) -> tuple[nn.Module, nn.Module | None]:
    """`shard(model, mesh)` and its reference policy: None for a LoRA model (the reference is its base, adapters
    disabled: `reference_of`), else a frozen, eval-mode copy sharded the same way (without a mesh,
    `frozen_copy(model)`).

    Under FSDP2 the copy never exists whole: it is deep-copied with every parameter a meta tensor (tied ones stay
    tied), sharded like `model`, given storage for its own shards only (`to_empty`), and each rank copies its
    shards and the buffers from `model`'s. So a rank holds one whole model while building, not two (the
    1.07B-parameter shape on 2 CPU processes: 4.81 GB per process instead of 8.55, `benchmarks/memory.py --build`),
    and the copy equals `model` exactly (`tests/test_sharding.py`)."""
    from modules.backbone import frozen_copy, is_lora

    if is_lora(model):
        return shard(model, mesh), None
    if mesh is None:
        return model, frozen_copy(model)
    meta = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False) for p in model.parameters()}
    reference = copy.deepcopy(model, memo=meta).requires_grad_(False).eval()
    buffers = dict(reference.named_buffers())         # `to_empty` replaces them: their values are copied back
    shard(model, mesh)
    shard(reference, mesh)
    reference.to_empty(device=next(model.parameters()).to_local().device)
    ours, theirs = dict(reference.named_parameters()), dict(model.named_parameters())
    if ours.keys() != theirs.keys():
        raise RuntimeError(f"{type(model).__name__}: the sharded copy's parameters are not the model's")
    with torch.no_grad():
        for name, p in ours.items():
            p.to_local().copy_(theirs[name].to_local())
        for name, b in reference.named_buffers():
            b.copy_(buffers[name])
    return model, reference


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 units inside `model` (empty for a model that is not sharded)."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_partitioned(model: nn.Module) -> bool:
    """DeepSpeed ZeRO-3 across ranks: a parameter holds its values only inside its own module's forward."""
    import torch.distributed as dist

    return (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
            and any(hasattr(p, "ds_id") for p in model.parameters()))


def is_sharded(model: nn.Module) -> bool:
    """Every forward of `model` is a collective call (FSDP2 or DeepSpeed ZeRO-3): all ranks must make as many."""
    return bool(fsdp_units(model)) or is_partitioned(model)


@contextlib.contextmanager
def gathered(model: nn.Module):
    """For the duration, every FSDP2 unit of `model` holds its whole parameters (one all-gather each, on entry)
    and keeps them across forwards: generation then calls no collective, so ranks may stop at different lengths.
    On exit the units are sharded again, the root back to staying gathered after its forward. No-op otherwise.
    Memory: the whole model on every rank while it lasts (as the rollout engines of other frameworks need)."""
    units = fsdp_units(model)
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not units[0], recurse=False)


_FULL_STATES: dict[int, dict] = {}


@contextlib.contextmanager
def full_state_dicts(module: nn.Module, rank: int):
    """Every rank enters: the whole state dict of each trained sharded model inside `module` (one with trainable
    parameters: not the reference or a reward model) is gathered to rank 0 (CPU), where `whole_state(model)`
    returns it for the duration. No-op when nothing is sharded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    roots = [root for root in _roots(module) if any(p.requires_grad for p in root.parameters())]
    try:
        for root in roots:
            state = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                _FULL_STATES[id(root)] = state
        yield
    finally:
        for root in roots:
            _FULL_STATES.pop(id(root), None)


def whole_state(model: nn.Module) -> dict | None:
    """`model`'s whole state dict inside `full_state_dicts` on rank 0; None for a model that is not sharded.
    A sharded model outside it is an error (its weights are spread over the ranks)."""
    if not fsdp_units(model):
        return None
    if id(model) not in _FULL_STATES:
        raise RuntimeError(f"{type(model).__name__} is sharded: export it inside `full_state_dicts` on rank 0")
    return _FULL_STATES[id(model)]


def _roots(module: nn.Module) -> list[nn.Module]:
    """The outermost FSDP2 units inside `module` (each stage's sharded models)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, FSDPModule):
        return [module]
    return [found for child in module.children() for found in _roots(child)]

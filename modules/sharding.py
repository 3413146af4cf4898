"""The one place for sharded models: FSDP2 (`torch.distributed.fsdp.fully_shard`), run by `FSDP2Strategy`, Lightning's
`ModelParallelStrategy` with every process in the data-parallel dimension (`configs/presets/fsdp.yaml` on GPUs,
`fsdp_cpu.yaml` on 2 CPU processes with gloo).

Each stage builds and shards its own models in `configure_model` (`build_sharded`, `build_with_reference`): the
whole model is built on the first rank only, the others build it empty and receive their shards (as accelerate's
`cpu_ram_efficient_loading` does). Every decoder layer is one FSDP unit, the rest of the model (embeddings, final
norm, LM or scalar head) the root unit (`shard`). Frozen models (the reference, a reward model) are sharded too.
Gradients are averaged over the ranks, as under DDP.

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
import logging
from typing import Callable

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from modules.checks import ConfigError

log = logging.getLogger(__name__)


class ShardingError(ConfigError):
    """A configuration that the sharded path cannot run (`train.py` prints it as one line, before training)."""


QUANTIZED = ("FSDP2 cannot shard 4-bit / 8-bit (bitsandbytes) weights: drop `quantization` from the backbone, or "
             "train QLoRA on one device")


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's `ModelParallelStrategy` as FSDP2 alone: every process in the data-parallel dimension (each
    rank its own share of the prompts), tensor parallel size 1, and checkpoints written as one file on rank 0
    (the trained weights and optimizer state, whole; the frozen weights are left out, `modules.checkpoints`;
    `--ckpt_path` resumes it exactly with the same number of processes, tested with 2).

    Args:
        save_distributed_checkpoint: write a folder with one shard per rank instead of one file (for models too
            large to gather on one rank; frozen weights included: its loader asks for every key). Resumes
            exactly, tested with 2 processes.
        process_group_backend: `nccl` on GPUs and `gloo` on CPU by default.
    """

    def __init__(self, save_distributed_checkpoint: bool = False, process_group_backend: str | None = None):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def lightning_module_state_dict(self) -> dict:
        """The weights for a checkpoint, gathered on rank 0, frozen ones left out before anything is gathered
        (`modules.checkpoints`; a distributed checkpoint keeps them: its loader needs every key). A module whose
        checkpoints hold some frozen weights (`checkpointed_frozen`: the RL reference with `ref_sync_steps`) has
        every weight gathered, and `on_save_checkpoint` drops the frozen ones it leaves out."""
        if self._save_distributed_checkpoint:
            return super().lightning_module_state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        keeps_frozen = bool(getattr(self.lightning_module, "checkpointed_frozen", ()))
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=not keeps_frozen)
        return get_model_state_dict(self.model, options=options)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        """Loads what the checkpoint holds; its frozen weights are left out, so the load is not strict: the
        module's `on_load_checkpoint` (`modules.checkpoints`) then checks the loaded names against its trained
        ones and its frozen weights against the checkpoint's digest."""
        module = self.lightning_module
        strict, module.strict_loading = module.strict_loading, False
        try:
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        finally:
            module.strict_loading = strict


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
        raise ShardingError(QUANTIZED)
    layers = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or ())}
    units = [m for m in model.modules() if type(m).__name__ in layers]
    if not units:
        raise ShardingError(f"{type(model).__name__}: no decoder layer classes (`_no_split_modules`) to shard")
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    return model


def build_sharded(build: Callable[..., nn.Module], spec, tokenizer, mesh, linears: torch.dtype | None = None
                  ) -> nn.Module:
    """`build(spec, tokenizer)` (`build_causal_lm` or `build_scorer`) sharded over `mesh`; built as usual without
    one, a LoRA model's frozen base linears then in the dtype `linears` when given (`modules.backbone.linears_in`).
    The whole model exists on the mesh's first rank only:

      1. every rank builds the model empty (`empty=True`: meta tensors; a pretrained model's config is read, not
         its weights), and the first rank also builds it whole, as it would without a mesh (a model that cannot
         be built empty on some rank, such as an adapter-only LoRA export, is built whole on every rank instead,
         with a warning);
      2. the ranks check that their empty models have the whole model's parameters, buffers and modules (names,
         shapes, dtypes, classes): a difference, or a build that failed on one rank, stops every rank (a
         `ShardingError` naming the rank and the reason) before any weight moves; the modules take the whole
         build's train / eval modes;
      3. every rank shards its empty model and gives it storage for its own shards only (`to_empty`);
      4. the first rank broadcasts each whole parameter in turn, every rank keeps its shard of it, and the first
         rank frees its copy; then the buffers (rotary tables included); then the first rank's random state, so
         every rank continues from the same state as before.

    So a rank holds its shards plus one parameter, and the first rank one whole model at most (the 1.07B shape on
    4 CPU processes: 12.3 GB for all four instead of 19.2, `benchmarks/memory.py --build`). The result equals the
    whole model exactly, modules in the whole build's train / eval mode (`tests/test_sharding.py`). 4-bit / 8-bit
    weights cannot be sharded (`ShardingError`)."""
    return _built_and_sharded(build, spec, tokenizer, mesh, reference=False, linears=linears)[0]


def build_with_reference(build: Callable[..., nn.Module], spec, tokenizer, mesh, linears: torch.dtype | None = None
                         ) -> tuple[nn.Module, nn.Module | None]:
    """The policy as `build_sharded` makes it, and its reference: None for a LoRA policy (the reference is its
    base, adapters disabled: `reference_of`), else a frozen, eval-mode copy (`frozen_copy` without a mesh). Without
    a mesh the frozen linear weights (the copy's, or a LoRA policy's base) are held in the dtype `linears` when given
    (`modules.backbone.linears_in`). Under FSDP2 the copy is
    sharded from the empty model and each rank copies its own shards into it: it is never whole either, and equals
    the policy exactly (in fp32)."""
    return _built_and_sharded(build, spec, tokenizer, mesh, reference=True, linears=linears)


def _built_and_sharded(build, spec, tokenizer, mesh, reference: bool, linears: torch.dtype | None = None
                       ) -> tuple[nn.Module, nn.Module | None]:
    import torch.distributed as dist
    from torch.distributed.tensor import distribute_tensor

    from modules.backbone import frozen_copy, is_lora, linears_in

    if mesh is None:
        model = build(spec, tokenizer)
        if is_lora(model):                   # (its base is frozen: the policy's and the reference's at once)
            return linears_in(model, linears), None
        return model, (linears_in(frozen_copy(model), linears) if reference else None)
    if spec.quantization:
        raise ShardingError(QUANTIZED)
    first, model, whole = mesh.get_local_rank() == 0, None, None
    try:
        model = build(spec, tokenizer, empty=True)
    except Exception as failure:             # e.g. an adapter-only export: no config of its own to build from
        if first:
            log.warning("warning: %s cannot be built empty (%s: %s); every rank builds it whole before sharding "
                        "(more memory while building)", spec.pretrained or "the model", type(failure).__name__, failure)
    if any(_gathered(model is None, mesh)):
        model = None
    error = None
    try:                                     # after the empty build: the whole build's random state is kept
        whole = build(spec, tokenizer) if first or model is None else None
        if model is None:                    # every rank builds it whole (one whole model each while building)
            model = _meta_twin(whole)
            whole = whole if first else None
    except Exception as failure:             # (a rank raising alone would leave the others waiting)
        error = failure
    _fail_together(error, mesh)
    _check_layouts(model, whole, mesh)
    source, group = dist.get_global_rank(mesh.get_group(), 0), mesh.get_group()
    modes = [[m.training for m in whole.modules()] if first else None]    # from_pretrained leaves eval mode
    dist.broadcast_object_list(modes, src=source, group=group)
    for module, training in zip(model.modules(), modes[0], strict=True):
        module.training = training
    copy_of = None
    if reference and not is_lora(model):
        copy_of = copy.deepcopy(model).requires_grad_(False).eval()
    device = _mesh_device(mesh)
    for empty in filter(None, (model, copy_of)):
        shard(empty, mesh)
        empty.to_empty(device=device)
    sent = dict(whole.named_parameters()) if first else {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            full = sent[name].detach().to(device) if first else torch.empty(p.shape, dtype=p.dtype, device=device)
            dist.broadcast(full, src=source, group=group)
            p.to_local().copy_(distribute_tensor(full, mesh, p.placements, src_data_rank=None).to_local())
            if first:
                sent[name].data = torch.empty(0, dtype=p.dtype)          # the whole copy goes as its shard arrives
        kept = dict(whole.named_buffers()) if first else {}
        for name, b in model.named_buffers():
            if first:
                b.copy_(kept[name])
            dist.broadcast(b, src=source, group=group)
        del whole, sent, kept
        state = [torch.get_rng_state()]
        dist.broadcast_object_list(state, src=source, group=group)
        torch.set_rng_state(state[0])
        if copy_of is not None:
            theirs = dict(model.named_parameters())
            for name, p in copy_of.named_parameters():
                p.to_local().copy_(theirs[name].to_local())
            ours = dict(model.named_buffers())
            for name, b in copy_of.named_buffers():
                b.copy_(ours[name])
    return model, copy_of


def _layout(model: nn.Module) -> list[tuple]:
    """What an empty build must share with the whole one: each parameter's and buffer's name, shape and dtype
    (tied parameters are listed once) and whether it is trained; each module's name and class."""
    return ([("parameter", n, tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in model.named_parameters()]
            + [("buffer", n, tuple(b.shape), str(b.dtype)) for n, b in model.named_buffers()]
            + [("module", n, type(m).__name__) for n, m in model.named_modules()])


def _gathered(value, mesh) -> list:
    """`value` from every rank of `mesh`, in rank order, on every rank."""
    import torch.distributed as dist

    everyone = [None] * mesh.size()
    dist.all_gather_object(everyone, value, group=mesh.get_group())
    return everyone


def _meta_twin(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose parameters are meta tensors (tied ones stay tied; buffers are copied)."""
    meta = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo=meta)


def _fail_together(error: Exception | None, mesh) -> None:
    """Every rank raises if any rank failed: its own error, or a `ShardingError` naming the first rank that failed
    and why. (One rank raising alone would leave the others waiting in their next collective.)"""
    import torch.distributed as dist

    everyone = _gathered(None if error is None else f"{type(error).__name__}: {error}", mesh)
    if error is not None:
        raise error
    failed = next(((rank, said) for rank, said in enumerate(everyone) if said is not None), None)
    if failed is not None:
        rank = dist.get_global_rank(mesh.get_group(), failed[0])
        raise ShardingError(f"rank {rank} could not build its model: {failed[1]}")


def _check_layouts(empty: nn.Module, whole: nn.Module | None, mesh) -> None:
    """Every rank's empty model has the whole model's layout (`whole` is on the first rank only), else a
    `ShardingError` on every rank (`_fail_together`)."""
    import torch.distributed as dist

    from modules.backbone import EMPTY_BUILD_EXTRA

    expected = [_layout(whole) if whole is not None else None]
    dist.broadcast_object_list(expected, src=dist.get_global_rank(mesh.get_group(), 0), group=mesh.get_group())
    ours = _layout(empty)
    mismatch = None
    if ours != expected[0]:
        first = next((a, b) for a, b in zip(ours + [None], expected[0] + [None]) if a != b)
        mismatch = ShardingError(
            f"{type(empty).__name__}: built empty (meta tensors) on rank {dist.get_rank()}, it differs from the whole "
            f"model built on rank {dist.get_global_rank(mesh.get_group(), 0)}: {first[0]} against {first[1]}; an "
            f"`extra` from_pretrained argument that changes the architecture is not applied to empty builds (only "
            f"{', '.join(EMPTY_BUILD_EXTRA)} are)")
    _fail_together(mismatch, mesh)


def _mesh_device(mesh) -> torch.device:
    """The device FSDP2 puts this rank's shards on: the CPU, or the current accelerator."""
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, getattr(torch, mesh.device_type).current_device())


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


def forwards_on_every_rank(count: int, model: nn.Module, device: torch.device) -> int:
    """The number of forwards of `model` to make when this rank needs `count`: `count` itself, or the most any
    rank needs when `model` is sharded (every rank calls this then; one all-reduce)."""
    if not is_sharded(model):
        return count
    import torch.distributed as dist

    most = torch.tensor(count, device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most)


@contextlib.contextmanager
def gathered(model: nn.Module):
    """For the duration, every FSDP2 unit of `model` holds its whole parameters (one all-gather each, on entry)
    and keeps them across forwards: generation then calls no collective, so ranks may stop at different lengths.
    On exit the units are sharded again, the root back to staying gathered after its forward. No-op otherwise.
    Memory: the whole model on every rank while it lasts (as the rollout engines of other frameworks need).
    Nested (the turns of a tool rollout, each a `sample`, inside one `gathered`): the inner ones do nothing."""
    if getattr(model, "_gathered", False):
        yield
        return
    units = fsdp_units(model)
    if units:
        model._gathered = True
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not units[0], recurse=False)
        if units:
            model._gathered = False


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

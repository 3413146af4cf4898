"""CPU-only speed shims, in one place. Each changes no number beyond float rounding (tested), applies only on a
CPU, and can be switched off:

  prepacked_linears    sampling: every plain nn.Linear computes through oneDNN with its weight reordered once per
                       `sample` call (private `torch.ops.mkldnn` ops). Off: `sampling: {prepack_weights: false}`.
  reuse_freed_memory   training on CPU: glibc keeps freed blocks for reuse (`mallopt` through ctypes) instead of
                       unmapping them. Off: P3O_REUSE_FREED_MEMORY=0, a preloaded jemalloc / tcmalloc, or FSDP2
                       (where it only fragments: `sharded_allocator_warning`).
  release_freed_memory after weights are replaced by smaller copies (`modules.backbone.linears_in`): glibc hands the
                       freed pages back (`malloc_trim`).

Timings: `benchmarks/decode.py` and `benchmarks/results/throughput/README.md`.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys

import torch

from modules.sharding import is_partitioned


@contextlib.contextmanager
def prepacked_linears(model, rows: int):
    """For the duration, every plain `nn.Linear` of `model` computes through oneDNN with its weight reordered once
    for inputs of `rows` rows (`torch.ops.mkldnn`), instead of `F.linear`, whose BLAS call repacks the weight at
    every call. Decoding calls each linear once per token with a few rows, where that repacking dominates: on the
    2-core AMD EPYC it cuts the decode time by about a third (`benchmarks/decode.py`). Same maths, rounding aside
    (`tests/test_cpu.py`): fp32 weights compute in fp32; under CPU bf16 autocast the weights are packed in
    bf16 and inputs cast to bf16, as autocast's `linear` does; bf16 weights compute in bf16.

    Applies only on CPU, when no parameter is partitioned (an FSDP2 model is gathered while sampling) and every
    plain linear has fp32 (or bf16) weights, one dtype for all of them outside autocast; elsewhere (GPU, fp16
    autocast, CPUs without oneDNN bf16 for bf16 work) it changes nothing. bitsandbytes and other `nn.Linear`
    subclasses keep their own forward. No autograd: generation only. Memory: a reordered copy of the linear weights
    while it is active (tied embeddings included)."""
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    dtype = _prepack_dtype(model, linears)
    if dtype is None:
        yield
        return
    try:
        for m in linears:
            packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach().to(dtype), rows)
            bias = None if m.bias is None else m.bias.detach().to(dtype)
            m.forward = functools.partial(_prepacked_linear, packed, bias, dtype)
        yield
    finally:
        for m in linears:
            m.__dict__.pop("forward", None)


def _prepack_dtype(model, linears: list) -> torch.dtype | None:
    """The dtype `prepacked_linears` computes in, or None where it does not apply."""
    if not (linears and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and not is_partitioned(model)):
        return None
    devices, dtypes = {m.weight.device.type for m in linears}, {m.weight.dtype for m in linears}
    if devices != {"cpu"} or not dtypes <= {torch.float32, torch.bfloat16}:
        return None
    if torch.is_autocast_enabled("cpu"):      # every weight cast to autocast's dtype (a frozen model's bf16 linears
        dtype = torch.get_autocast_dtype("cpu")   # beside its fp32 tied head: `modules.backbone.linears_in`)
    elif len(dtypes) == 1:
        dtype = dtypes.pop()
    else:
        return None
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    return dtype if dtype in (torch.float32, torch.bfloat16) else None


def _prepacked_linear(packed: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, x: torch.Tensor):
    return torch.ops.mkldnn._linear_pointwise(x.to(dtype), packed, bias, "none", [], "")


def preloaded_allocator() -> str | None:
    """The malloc that LD_PRELOAD puts in place of glibc's (jemalloc, tcmalloc or mimalloc), or None."""
    preload = os.environ.get("LD_PRELOAD", "")
    return next((name for name in ("jemalloc", "tcmalloc", "mimalloc") if name in preload), None)


def sharded_allocator_warning() -> str | None:
    """The line `train.py` logs when FSDP2 runs on CPU under glibc's malloc (Linux, nothing preloaded); None
    otherwise. Measured at the base point of `benchmarks/memory.py --strategies fsdp2` on 2 processes
    (`benchmarks/results/memory`): glibc as it comes 4.2-4.5 GB per process, 4.9-5.2 with `reuse_freed_memory`
    (which `train.py` therefore leaves off under FSDP2), tcmalloc 3.0 GB at the same speed."""
    if not sys.platform.startswith("linux") or preloaded_allocator():
        return None
    return ("FSDP2 on CPU under glibc's malloc holds more memory per process than tcmalloc (an RL step of a 135M "
            "model: 4.2-4.5 GB against 3.0 at the same speed, benchmarks/results/memory); preload it: "
            "LD_PRELOAD=libtcmalloc_minimal.so.4 python train.py ... (Debian/Ubuntu: apt install libtcmalloc-minimal4)")


def release_freed_memory() -> bool:
    """Hand the pages of freed memory back to the OS (glibc's `malloc_trim(0)`), where glibc's malloc is in use
    (Linux, nothing preloaded); returns whether it ran.

    With `reuse_freed_memory` glibc keeps every freed block mapped, so weights replaced by a smaller copy stay
    resident: casting a LoRA base's linears of the 1.07B shape to bf16 (`modules.backbone.linears_in`) left the
    3.9 GB of fp32 weights in the process, and its RL step peaked 1.4 GB above the uncast run's (8.47 GB against
    7.08, `benchmarks/results/memory`). `linears_in` calls this after casting; what is handed back is mapped again,
    page by page, when the process needs it."""
    if not sys.platform.startswith("linux") or preloaded_allocator():
        return False
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def reuse_freed_memory() -> bool:
    """CPU training: let glibc keep freed memory for the next allocation instead of returning it to the OS.

    By default glibc serves blocks above its mmap threshold (128 KB, rising to at most 32 MB) from a fresh mmap and
    unmaps them on free, so blocks of 50-113 MB (logits over a 49k vocabulary, an embedding's gradient) pay page
    faults to zero their pages again on every step. `mallopt` with no mmap and no trimming reuses them. Numbers are
    unchanged; the process keeps its peak memory mapped, and memory freed in blocks of one size is not returned for
    blocks of another: with micro-batches, peak RSS is well above the tensors ever alive at once
    (`benchmarks/allocator.py`: 1.43 GB against 0.49 for one checkpointed micro-batch of 1024 tokens).

    A better allocator does both: tcmalloc, preloaded (`LD_PRELOAD=libtcmalloc_minimal.so.4`, Debian/Ubuntu package
    libtcmalloc-minimal4), took the whole base point of `benchmarks/memory.py` from 4.23-4.54 GB to 3.83-3.85 GB at
    the same speed, and its 151,936-vocabulary point from 6.85 to 5.72 GB (`benchmarks/results/memory`); jemalloc
    kept as little, a little slower. Where LD_PRELOAD names jemalloc, tcmalloc or mimalloc, glibc's malloc is not the
    one in use and this does nothing. Off with P3O_REUSE_FREED_MEMORY=0 (add glibc's MALLOC_MMAP_THRESHOLD_=1048576
    to bring RSS down to the tensors alive, for more page faults), and a no-op where libc is not glibc. Returns
    whether it was applied."""
    if os.environ.get("P3O_REUSE_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if preloaded_allocator():
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4                   # glibc <malloc.h>
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False

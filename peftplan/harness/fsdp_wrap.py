"""How peftplan wraps a built model with PyTorch FSDP2 (`fully_shard`): one function, used by the
fake-process-group trace (`fsdp_trace.trace_fsdp`) and by the real multi-rank profiler
(`profile.py` under torchrun), so the engine's sharding model, the trace and the measurement agree.

The wrapping is accelerate's FSDP2 path: `fully_shard` on every decoder layer, then on the root, with
`MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=compute, output_dtype=compute)` for mixed
precision (accelerate `FullyShardedDataParallelPlugin.set_mixed_precision`), none otherwise;
`reshard_after_forward=True` for fsdp-full and fsdp-hybrid, False for fsdp-grad-op (ZeRO-2-like).
fsdp-hybrid (HSDP) uses a 2-D DeviceMesh ("replicate", "shard") of shape
(n_gpus // shard_n, shard_n) with shard_n = min(n_gpus, gpus_per_node), as engine/sharding.py assumes.
"""

from __future__ import annotations

from typing import Any

import torch

from ..training import Training
from . import NotTraceable
from .build import find_blocks

FSDP2_SHARDS = ("fsdp-full", "fsdp-grad-op", "fsdp-hybrid")


def compute_torch_dtype(training: Training) -> torch.dtype:
    name = training.compute_dtype.name
    return torch.bfloat16 if name == "bf16" else (torch.float16 if name == "fp16" else torch.float32)


def mp_policy(training: Training) -> Any:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if not training.mixed:
        return MixedPrecisionPolicy()
    cd = compute_torch_dtype(training)
    return MixedPrecisionPolicy(param_dtype=cd, reduce_dtype=cd, output_dtype=cd)


def reshard_after_forward(training: Training) -> bool:
    return training.shard != "fsdp-grad-op"


def mesh_shape(training: Training) -> tuple[int, ...]:
    """(N,) for fsdp-full / fsdp-grad-op; (replicas, shard_n) for fsdp-hybrid."""
    n = training.n_gpus
    if training.shard not in FSDP2_SHARDS:
        raise NotTraceable(f"FSDP2 wrapping covers {', '.join(FSDP2_SHARDS)}, not {training.shard}")
    if training.shard == "fsdp-hybrid":
        shard_n = min(n, training.gpus_per_node)
        if n % shard_n:
            raise NotTraceable(f"fsdp-hybrid: {n} GPUs are not a multiple of {shard_n} GPUs per node")
        return (n // shard_n, shard_n)
    return (n,)


def fsdp_mesh(training: Training, device_type: str) -> Any:
    """The DeviceMesh for this training setup (outside any fake mode: the mesh holds real rank ids)."""
    from torch.distributed.device_mesh import init_device_mesh

    shape = mesh_shape(training)
    names = ("replicate", "shard") if len(shape) == 2 else None
    return init_device_mesh(device_type, shape, mesh_dim_names=names)


def wrap_fsdp(built: Any, arch: Any, training: Training, mesh: Any) -> torch.nn.Module:
    """`fully_shard` every decoder layer of `built.base`, then the root `built.model` (in place)."""
    from torch.distributed.fsdp import fully_shard

    mp = mp_policy(training)
    reshard = reshard_after_forward(training)
    for _, block in find_blocks(built.base, arch):
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(built.model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    return built.model

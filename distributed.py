"""distributed.py — training over several processes (torchrun): data parallel, or the model sharded.

    torchrun --standalone --nproc_per_node=2 train.py --init=...              # DDP (gloo on CPU)
    torchrun --standalone --nproc_per_node=2 train.py --fsdp=True --init=...  # FSDP

Several processes split each batch. By default each holds the whole model and DDP averages
the gradients (data_parallel); --fsdp=True shards every weight, frozen or trained, across them
instead (shard), for a model that does not fit one device. Checkpoints are the same either
way: the whole routers and LoRA, loadable on one device (whole, held_as).
"""
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from load_weights import NonFiniteError


def setup_distributed(config):
    """(rank, world size); a torchrun launch starts gloo (CPU) or NCCL (GPU, one per process)."""
    if "RANK" not in os.environ:
        return 0, 1
    if config["device"].startswith("cuda"):
        config["device"] = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(config["device"])
    dist.init_process_group("nccl" if config["device"].startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()


def all_reduce_mean(values: list, world: int, device="cpu") -> list:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)     # NCCL reduces device tensors only
    dist.all_reduce(t)
    return (t / world).tolist()


def gathered(t: torch.Tensor, world: int) -> torch.Tensor:
    """Every process's t (the same shape on each), concatenated in rank order."""
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t)
    return torch.cat(parts)


def data_parallel(model, world: int, config: dict):
    """The student pass's module: model itself; over several processes its DDP wrapper, which
    averages the trained gradients across processes during backward; or with --fsdp the model
    itself, sharded in place (shard).

    Only routers and LoRA require gradients, so only they are reduced; every one of them is
    used by every student pass (all routers run on the masked path), so no search for unused
    parameters. No initial broadcast either: every rank built the same model from the same
    files and seed, and fits its routers on the same windows (a resume reads the same checkpoint).
    """
    if world == 1:
        return model
    if config["fsdp"]:
        return shard(model, world, config["device"])
    return DistributedDataParallel(model, init_sync=False)


def shard(model, world: int, device: str):
    """--fsdp: every weight, frozen or trained, split into one shard per process (fully_shard,
    in place); returns the model.

    Each Block is one unit and the root (embeddings, final norm, head) another: a unit's weights
    are gathered whole just before it runs and freed after, so a process holds its shards plus
    about one block at a time (the root's stay whole from the forward to the backward: the loss
    uses the head). Backward reduce-scatters the routers' and LoRA's gradients, and each
    process's AdamW updates its own shard of them. The shards go to the mesh's device: on CUDA,
    the process's GPU, from the host memory the model was loaded into (setup).
    """
    mesh = init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (world,))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextmanager
def no_sync(student):
    """Backward without the exchange of gradients, which stay with each process until a later
    backward exchanges their sum (the micro-batches before the last one)."""
    if isinstance(student, DistributedDataParallel):
        with student.no_sync():
            yield
        return
    student.set_requires_gradient_sync(False)      # --fsdp
    try:
        yield
    finally:
        student.set_requires_gradient_sync(True)


def whole(t: torch.Tensor) -> torch.Tensor:
    """t, or the whole tensor when train.py --fsdp holds t sharded across processes (a DTensor)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def held_as(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A whole tensor t as parameter p holds it: t itself, or under train.py --fsdp (p a DTensor)
    this process's shard of t (every process must call this, in the same order)."""
    if not hasattr(p, "device_mesh"):
        return t
    from torch.distributed.tensor import distribute_tensor   # already loaded, since p is a DTensor
    return distribute_tensor(t.to(p.device), p.device_mesh, p.placements)


def can_save_after(world: int, fsdp: bool, e: BaseException) -> bool:
    """Whether a run stopped by e can still save: always in one process or under DDP (rank 0
    holds everything), under --fsdp only after a NaN, which every process meets at the same point.
    After an error or a signal the processes stand at different places, and gathering the shards
    would wait forever: the last periodic checkpoint stands."""
    return world == 1 or not fsdp or isinstance(e, NonFiniteError)

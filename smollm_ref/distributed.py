"""More than one process: DDP or FSDP2 under torchrun, gloo on CPU and NCCL on GPUs.

`torchrun --nproc_per_node N -m smollm_ref.train ...` (on each of several nodes: `--nnodes N --node-rank R
--rdzv-endpoint HOST:PORT`) sets RANK / WORLD_SIZE / LOCAL_RANK; without them everything here is a no-op for
one process. Global rank 0 alone logs and writes checkpoints (every rank writes its shard of an FSDP
optimizer state); every rank takes part in the collectives that gather a sharded model's full state.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """The number of processes torchrun started (all nodes), 1 outside torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device_type: str) -> Dist:
    """Join the process group torchrun describes (if any): RANK is the global rank (rank 0 alone writes),
    LOCAL_RANK the rank on this node, which picks the GPU. CUDA ranks get their own GPU."""
    world = env_world_size()
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Dist(rank, world, local)


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def mean(d: Dist, value: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (the value itself for one process)."""
    if d.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= d.world_size
    return value


def total(d: Dist, value: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (the value itself for one process)."""
    if d.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_objects(d: Dist, value) -> list:
    """`value` of every rank, in rank order ([value] for one process); a collective, pickled: for small values such
    as a run's options."""
    if not d.enabled:
        return [value]
    out = [None] * d.world_size
    dist.all_gather_object(out, value)
    return out


def all_tensors(d: Dist, value: torch.Tensor) -> list[torch.Tensor]:
    """`value` of every rank (the same shape and dtype on each, on the collective's device), in rank order; [value]
    for one process."""
    if not d.enabled:
        return [value]
    out = [torch.empty_like(value) for _ in range(d.world_size)]
    dist.all_gather(out, value)
    return out


def any_rank(d: Dist, flag: bool, device) -> bool:
    """True if `flag` is true on any rank, so that all ranks take the same branch."""
    if not d.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def wrap(model: torch.nn.Module, d: Dist, fsdp: bool, device: torch.device) -> torch.nn.Module:
    """DDP, or FSDP2 (`fully_shard` per decoder layer, then the root, which holds the tied embedding)."""
    if not d.enabled:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _full(value):
    """A whole tensor on CPU from a DTensor shard (a collective: every rank calls it) or a plain tensor."""
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return value.detach().cpu() if torch.is_tensor(value) else value


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU (under FSDP every rank must call this: DTensor shards gather)."""
    return {k: _full(v) for k, v in model.state_dict().items()}


def load_optimizer_state(optimizer, state: dict, fsdp: bool) -> None:
    """Load an optimizer state of whole tensors, index-keyed (`optimizer.state_dict()` of DDP or one process, or
    of an FSDP run from before its state was saved in shards, `smollm_ref.train.sharded`): any number of ranks
    reads it, each keeping the shard its parameters hold."""
    if fsdp:  # shard each whole tensor the way its parameter is sharded
        from torch.distributed.tensor import distribute_tensor

        params = [p for group in optimizer.param_groups for p in group["params"]]
        sharded = {}
        for i, s in state["state"].items():
            p = params[int(i)]
            sharded[i] = {
                k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
                if torch.is_tensor(v) and v.dim() > 0 and hasattr(p, "device_mesh")
                else v
                for k, v in s.items()
            }
        state = {"state": sharded, "param_groups": state["param_groups"]}
    optimizer.load_state_dict(state)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device of `--device NAME` (auto: CUDA, else MPS, else CPU); a bare `cuda` is this process's
    `local_rank` GPU (torchrun's LOCAL_RANK). Raises ValueError (one line) for a device this machine lacks."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked but no CUDA device is available; use --device cpu or auto")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); pass cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps was asked but MPS is not available; use --device cpu or auto")
    return device

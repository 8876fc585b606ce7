"""torchrun awareness: process group, device, rank-0 helpers. One process works the same way.

Under `torchrun --nproc-per-node N -m tunelab pretrain ...` the environment carries RANK and
WORLD_SIZE; we join the process group and wrap the model in DDP. On GPUs the group is
"cpu:gloo,cuda:nccl": collectives on CUDA tensors go over nccl, the few on CPU tensors (objects,
checkpoint decisions) over gloo, so no call site has to know which device a tensor is on.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over processes, in place; `value` should live on self.device (no host sync on GPU)."""
        if self.enabled:
            tdist.all_reduce(value, op=tdist.ReduceOp.SUM)
        return value

    def all_gather_object(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def broadcast_object(self, obj):
        if not self.enabled:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]


def init() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group(backend="cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
        atexit.register(lambda: tdist.is_initialized() and tdist.destroy_process_group())
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device)


def wrap(model, d: Dist):
    """DDP when distributed; the plain model otherwise. FSDP2 arrives with sharded checkpoints."""
    if not d.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [d.local_rank] if d.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def shutdown(d: Dist) -> None:
    """The end of a stage; the process group stays joined until the process exits (atexit above). A
    process may run several stages (`tunelab run`, a lottery), and a group created again after
    destroy_process_group meets the first one's keys in torchrun's store: gloo then connects to an
    address that is gone ("Connection refused") or hangs."""

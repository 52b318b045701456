"""Where a process runs: the torchrun environment, the device, the torch threads of a thread, and the process
group of a training stage.

The one place that reads torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE; without
torchrun the run is one process, rank 0 of 1) and that picks a device from a `device` setting. Under
torchrun extraction shards by rank, and the training stages (`pipeline pretrain`, `pipeline fuse`) use
:class:`Dist`: with WORLD_SIZE > 1 it starts the process group (nccl on CUDA, gloo on the CPU) unless
one is already running, and ends it on :meth:`close` only if it started it; every collective returns its
input in a single process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.errors import PipelineError

__all__ = ["Dist", "Torchrun", "pick_device", "torchrun", "use_threads"]


@dataclass(frozen=True)
class Torchrun:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def torchrun() -> Torchrun:
    """This process's place among torchrun's processes (rank 0 of 1 without torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Torchrun(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")),
                    int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))


def use_threads(n: int) -> None:
    """n torch (OpenMP) threads for the calls of this thread. `torch.set_num_threads` also sets a value shared by
    the process, which a thread new to torch takes on its first op, over what it set itself: asking first
    settles this thread's own before setting it."""
    torch.get_num_threads()
    torch.set_num_threads(n)


def pick_device(want: str, setting: str = "device") -> torch.device:
    """"auto" (CUDA when there is one), "cpu" or "cuda"; on CUDA the GPU of this process's LOCAL_RANK."""
    if want == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"{setting} = 'cuda' but torch sees no CUDA device")
    if want == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torchrun().local_rank % torch.cuda.device_count())


class Dist:
    """This process's rank, world and device, and the few collectives the training stages use.

    want_device: "auto" (CUDA when there is one), "cpu" or "cuda"; `setting` names the config key
    in the error raised when "cuda" is asked for and there is none.
    """

    def __init__(self, want_device: str, setting: str = "device"):
        env = torchrun()
        self.world, self.rank, self.local_rank, self.local_world = env.world, env.rank, env.local_rank, env.local_world
        self.device = pick_device(want_device, setting)
        cuda = self.device.type == "cuda"
        # NCCL needs a GPU per process. A process bound to one GPU (CUDA_VISIBLE_DEVICES naming one device, as
        # Slurm's --gpus-per-task=1 does) sees a single device whatever the number of local processes.
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        bound = visible != "" and "," not in visible
        if cuda and self.world > 1 and self.local_world > torch.cuda.device_count() and not bound:
            n = torch.cuda.device_count()
            raise PipelineError(f"{self.local_world} processes on this machine but {n} CUDA device(s): NCCL needs "
                                f"a GPU per process; start torchrun with --nproc_per_node {n}, or set "
                                f"{setting} = 'cpu' (gloo)")
        if cuda:
            torch.cuda.set_device(self.device)
        self.owns_group = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", device_id=self.device if cuda else None)
            self.owns_group = True
        self.active = self.world > 1 and dist.is_initialized()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def gather(self, obj) -> list:
        """Every rank's `obj` (any picklable object), in rank order, on every rank."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def describe(self) -> str:
        if self.device.type == "cuda":
            name = f"cuda ({torch.cuda.get_device_name(self.device)}, bf16 autocast)"
        else:
            n = torch.get_num_threads()
            name = f"cpu ({n} thread{'s' if n != 1 else ''})"
        return name + (f" x {self.world} processes" if self.world > 1 else "")

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()

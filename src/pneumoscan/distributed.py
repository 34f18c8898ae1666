"""Several processes training one model with PyTorch's DistributedDataParallel.

`spawn` starts N local processes (gloo on CPUs, NCCL on GPUs); under `torchrun` (several
machines) the process group comes from its environment. Each global batch is split across the
ranks, whose gradients DDP averages; rank 0 validates, decides, and writes checkpoints and the
model.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Callable

import torch
import torch.distributed as dist

from pneumoscan.errors import PneumoscanError


def spawn(target: Callable, devices: int, device: torch.device, options: dict) -> None:
    """Run `target(**options)` (`train.train`) in `devices` local processes joined in one
    process group, each on a device of `device`'s type."""
    import torch.multiprocessing as mp

    if device.type == "cuda" and devices > torch.cuda.device_count():
        raise PneumoscanError(f"--devices {devices}: only {torch.cuda.device_count()} GPU(s) here")
    with socket.socket() as probe:  # a free port for the rendezvous on this machine
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    try:
        mp.start_processes(
            _worker,
            args=(devices, port, device.type, target, options),
            nprocs=devices,
            start_method="spawn",
        )
    except mp.ProcessRaisedException as exc:  # its message is the worker's whole traceback
        raise PneumoscanError(str(exc).strip().splitlines()[-1].split(": ", 1)[-1]) from None


def _worker(rank, world, port, device_type, target, options) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    if device_type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        target(**options, device_name=device_type, force=True)
        # Rank 0 saves and post-fits alone; a rank that tore the group down meanwhile could
        # abort in gloo's teardown. All leave together.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def join_process_group(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device): from torchrun's or `spawn`'s environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def is_main() -> bool:
    """Whether this process writes results: rank 0, or the only process."""
    return not dist.is_initialized() or dist.get_rank() == 0


def on_rank_0(compute: Callable[[], tuple], main: bool, world: int) -> tuple:
    """`compute()` on rank 0, its result on every rank."""
    result = [compute() if main else None]
    if world > 1:
        dist.broadcast_object_list(result, src=0)
    return result[0]


def gather(value: object, world: int) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    if world == 1:
        return [value]
    values = [None] * world
    dist.all_gather_object(values, value)
    return values


def sync_buffers(network: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank, as DDP's forward does."""
    for buffer in network.buffers():
        dist.broadcast(buffer, src=0)


def check_ranks_agree(network: torch.nn.Module, world: int, log: Callable[[str], None]) -> None:
    """Every rank must end with the same weights; a difference is a bug, never ignored."""
    digest = hashlib.sha256()
    for name, tensor in network.state_dict().items():
        digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    digests = gather(digest.hexdigest(), world)
    if len(set(digests)) != 1:
        raise RuntimeError(f"distributed training: the ranks' weights differ ({digests})")
    log(f"all {world} processes hold identical weights (sha256 {digests[0][:12]})")

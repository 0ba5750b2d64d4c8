"""Scale-out on torch.distributed: `torchrun --nproc-per-node N -m compress ...` with a single process's flags.

The process group comes from torchrun's environment (NCCL when blocks compute on CUDA, gloo on the CPU). Each rank
holds every `size`-th calibration window (both streams) and runs the blocks' forwards on them; the statistics of each
linear (Grams, cross terms) are summed across ranks; each layer's solve is owned by one rank, the owners of a capture
step balanced by the solve's cost (longest first, to the least loaded rank), and the compressed layer broadcast to the
others, except a layer too large for one rank (an 8B down_proj, or any capture step of one layer), which all ranks
solve together, each its share of GPTQ's rows, the inverse Hessian factor built by the first rank on the threads of
all where they share a machine (`pooled_threads`), else by all, each its rows; every rank propagates its own windows
through the compressed block. Learned quantizers (LRQ, CBQ, SignRound) draw each step's batch from every rank's
windows and average their gradients across ranks (`average_gradients`), so every rank learns the same weights; LoRAP
sums its channel norms. Rank 0 writes the output and shows the progress.
Without torchrun (WORLD_SIZE unset or 1) every function here is the single-process identity.

The same world size gives the same files run to run (gloo's and NCCL's sums run in a fixed order for a fixed size);
against one process the Grams differ by the order of their float sums, so the layers differ where a rounding
decision sat on that last bit.
"""
from __future__ import annotations

import functools
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from compress.errors import CompressError

TIMEOUT = timedelta(minutes=30)  # a rank waiting on a collective gives up after this (a dead peer usually errs sooner)
COLLECTIVE_SECONDS = [0.0]  # this process's time in collectives: transfers, and waiting for the slowest rank


@contextmanager
def collective():
    started = time.perf_counter()
    try:
        yield
    finally:
        COLLECTIVE_SECONDS[0] += time.perf_counter() - started


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def world(device: torch.device | str = "cpu") -> World:
    """This process's place in the run: the torchrun process group (started on first use), or a single process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1 or not dist.is_available():
        return World()
    if not dist.is_initialized():
        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
        except (RuntimeError, ValueError) as exc:
            raise CompressError(f"cannot join the torch.distributed process group: {str(exc).splitlines()[0]}") \
                from None
    return World(dist.get_rank(), dist.get_world_size())


def current() -> World:
    """This process's place in a process group already joined (see `world`), else a single process: what the
    learned quantizers read, which run inside the pipeline's block loop and never start a group themselves."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def shard(input_ids: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's calibration windows: every size-th, from its rank on."""
    if len(input_ids) < world.size:
        raise CompressError(f"{len(input_ids)} calibration windows cannot be shared by {world.size} ranks: "
                            "raise --nsamples or start fewer processes")
    return input_ids[world.rank::world.size]


def sum_(tensors: list[torch.Tensor], world: World) -> None:
    """Sum each tensor across ranks, in place."""
    if world.size > 1:
        with collective():
            for tensor in tensors:
                dist.all_reduce(tensor)


def total(values: list[float], world: World) -> list[float]:
    """Each float summed across ranks (float64)."""
    if world.size == 1:
        return values
    summed = torch.tensor(values, dtype=torch.float64, device=communication_device())
    with collective():
        dist.all_reduce(summed)
    return summed.tolist()


def share_of_batch(batch_size: int, windows: int, world: World) -> int:
    """How many windows a rank draws for a step of a learned quantizer whose batch is `batch_size` windows over all
    ranks: ceil(batch_size / size), at most the `windows` it holds."""
    return max(1, min(-(-batch_size // world.size), windows))


def mean(value: float, count: int, world: World) -> float:
    """The mean over all ranks' windows of a per-window mean `value` over this rank's `count` windows."""
    if world.size == 1:
        return value
    summed, counted = total([value * count, float(count)], world)
    return summed / counted


def average_gradients(params: list[torch.Tensor], count: int, world: World) -> None:
    """Replace each parameter's gradient (of a mean over this rank's `count` windows) by the gradient of the mean over
    every rank's windows: the ranks' gradients weighted by their window counts, summed in float64 in one all-reduce.
    Every rank then takes the same step from the same parameters, so the learned weights agree on every rank."""
    if world.size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    counted = torch.ones(1, dtype=torch.float64, device=grads[0].device)  # the last entry sums the window counts
    flat = torch.cat([g.reshape(-1).double() for g in grads] + [counted]).mul_(count)
    flat = flat.to(communication_device())
    with collective():
        dist.all_reduce(flat)
    flat = (flat[:-1] / flat[-1]).to(grads[0].device)
    for p, piece in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = piece.reshape(p.shape).to(p.dtype)


def most(value: float, world: World) -> float:
    """The largest of a float across ranks."""
    if world.size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=communication_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def least(value: int, world: World) -> int:
    """The smallest of an integer across ranks."""
    if world.size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=communication_device())
    with collective():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def owners(costs: list[float], size: int) -> list[int]:
    """The rank that solves each item: longest first, each to the least loaded rank (the lowest on a tie)."""
    load = [0.0] * size
    owner = [0] * len(costs)
    for item in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(size), key=lambda r: (load[r], r))
        owner[item], load[rank] = rank, load[rank] + costs[item]
    return owner


def together_items(costs: list[float], size: int) -> list[int]:
    """The items too large for one rank, solved by all ranks together: largest first, each whose cost exceeds an
    equal share of all that remains (a capture step of one layer; an 8B down_proj beside the rest of its block)."""
    remaining = sum(costs)
    chosen = []
    for item in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        if costs[item] <= remaining / size:
            break
        chosen.append(item)
        remaining -= costs[item]
    return chosen


def share(items: list, costs: list[float], solve: Callable, world: World) -> list:
    """[solve(item) for item in items] on every rank, the work shared by the ranks (relative costs `costs`).

    An item too large for one rank (`together_items`) is solved by every rank `together`, the solvers splitting what
    divides by rows (GPTQ's inverse Hessian factor and column loop, the output error); rank 0's result is kept, so
    that any part solved on every rank agrees to the bit. The others are each solved by one owner (balanced by
    cost) and broadcast; every owner solves all its items before any broadcast, so the ranks solve side by side."""
    if world.size == 1:
        return [solve(item) for item in items]
    results = {}
    shared = together_items(costs, world.size)
    with together(world):
        for i in shared:
            results[i] = broadcast_object(solve(items[i]), 0)
    rest = [i for i in range(len(items)) if i not in shared]
    owner = dict(zip(rest, owners([costs[i] for i in rest], world.size)))
    mine = {i: solve(items[i]) for i in rest if owner[i] == world.rank}
    for i in rest:
        results[i] = broadcast_object(mine.get(i), owner[i])
    return [results[i] for i in range(len(items))]


def broadcast_object(value, src: int):
    """Rank `src`'s picklable value, on every rank (the process group is joined)."""
    payload = [value]
    with collective():
        dist.broadcast_object_list(payload, src=src, device=communication_device())
    return payload[0]


TEAM = [World()]  # the ranks that solve the current layer together (`share`, a layer too large for one rank)


@contextmanager
def together(world: World):
    """Within the context every rank of `world` runs the same solve, and the solvers that can split it by rows do."""
    previous, TEAM[0] = TEAM[0], world
    try:
        yield
    finally:
        TEAM[0] = previous


def team() -> World:
    """The ranks solving the current layer together (`together`); a single process otherwise."""
    return TEAM[0]


def one_host(world: World) -> bool:
    """Whether every rank of `world` runs on this machine (host names gathered once: a collective on first use)."""
    return world.size == 1 or len(set(_host_names(world))) == 1


@functools.cache
def _host_names(world: World) -> tuple[str, ...]:
    names = [None] * world.size
    with collective():
        dist.all_gather_object(names, socket.gethostname())
    return tuple(names)


@contextmanager
def pooled_threads(world: World):
    """Within the context this process computes on the threads of every rank of `world` (ranks of one machine that
    wait on it meanwhile): torch's thread count, which LAPACK follows (compress.linalg.lapack_threads), times the
    world size, at most the cores this process may use."""
    threads = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(threads, min(threads * world.size, cores)))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def row_bounds(count: int, world: World, cubic: bool = False) -> list[int]:
    """Where each rank's share of `count` rows starts, then `count`: equal shares; with `cubic`, equal costs where a
    row's cost grows with the square of the rows from it to the end (the rows of an upper triangular inverse):
    rank r starts at count (1 - (1 - r / size)^(1/3))."""
    fractions = [1 - (1 - r / world.size) ** (1 / 3) if cubic else r / world.size for r in range(world.size)]
    return [round(count * fraction) for fraction in fractions] + [count]


def broadcast_(tensor: torch.Tensor, src: int, world: World) -> None:
    """Rank `src`'s tensor to every rank, in place."""
    if world.size > 1:
        with collective():
            dist.broadcast(tensor, src=src)


def broadcast_async(tensor: torch.Tensor, src: int, world: World):
    """Start sending rank `src`'s tensor to every rank, in place; `wait` on what it returns before reading it (on a
    rank other than `src`) or writing it (on `src`). The transfer runs while the caller computes."""
    if world.size == 1:
        return None
    with collective():
        return dist.broadcast(tensor, src=src, async_op=True)


def wait(work) -> None:
    """Wait for a transfer `broadcast_async` started (None: nothing to wait for)."""
    if work is not None:
        with collective():
            work.wait()


def share_rows(tensors: list[torch.Tensor], bounds: list[int], world: World) -> None:
    """Rows [bounds[r], bounds[r + 1]) of each contiguous tensor, computed by rank r, broadcast from it, in place."""
    for rank in range(world.size):
        for tensor in tensors:
            if bounds[rank + 1] > bounds[rank]:
                broadcast_(tensor[bounds[rank]:bounds[rank + 1]], rank, world)


def barrier(world: World) -> None:
    if world.size > 1:
        with collective():
            dist.barrier()


def close() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def communication_device() -> torch.device:
    """Where collectives' own tensors live: the current CUDA device under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")

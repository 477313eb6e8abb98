"""The multi-process launcher: :func:`run_ranks` starts one process per rank (``torch.multiprocessing``,
spawn), joins them into a process group and returns what each rank's function returned -- for
tests and benchmarks (``torchrun`` without the launcher). A rank that hangs is killed at a
deadline; each rank runs the teardown hooks of :mod:`moe_kernels.core.distributed` before its
group is destroyed.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import queue
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.queues import Queue as ProcessQueue
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_kernels.core.distributed import run_teardown


@dataclasses.dataclass(frozen=True)
class RankFailure:
    """What a rank raised, in a form that crosses process boundaries."""

    rank: int
    type_name: str
    message: str
    traceback: str

    def __str__(self) -> str:
        return f"rank {self.rank}: {self.type_name}: {self.message}"


class RanksFailedError(RuntimeError):
    """One or more ranks raised; ``failures`` holds each one with its traceback."""

    def __init__(self, failures: list[RankFailure]) -> None:
        self.failures = failures
        detail = "\n".join(f"--- rank {f.rank} ---\n{f.traceback}" for f in failures)
        super().__init__(f"{len(failures)} rank(s) failed: " + "; ".join(map(str, failures)) + "\n" + detail)


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    backend: str = "gloo",
    *,
    args: Sequence[Any] = (),
    timeout_s: float = 300.0,
    collective_timeout_s: float | None = None,
    env: Mapping[str, str] | None = None,
    return_exceptions: bool = False,
) -> list[Any]:
    """Run ``fn(group, *args)`` on ``world_size`` fresh processes and return their results by rank.

    Each process joins the default process group (``backend`` "gloo" on CPUs, "nccl" with one
    GPU per rank: rank r uses ``cuda:r``) through a TCP store this process serves on a free
    loopback port, so concurrent launches never race for a port. ``fn`` and ``args`` must be
    picklable (module-level functions); results should be plain Python data or CPU tensors.

    ``collective_timeout_s`` (default: ``timeout_s``) bounds each collective, so a mismatched
    collective raises on the ranks instead of hanging; ``timeout_s`` bounds the whole run, after
    which the processes still alive are killed and ``TimeoutError`` is raised. A rank that raises
    makes the call raise :class:`RanksFailedError` unless ``return_exceptions``, in which case
    its slot holds a :class:`RankFailure`.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(f"backend nccl needs one GPU per rank: {world_size} ranks, {torch.cuda.device_count()} GPUs")
    ctx = mp.get_context("spawn")
    # the store lives as long as this call: the ranks rendezvous through it
    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=timeout_s)
    )
    results: ProcessQueue[tuple[int, Any]] = ctx.Queue()
    rank_args = (world_size, backend, store.port, collective_timeout_s or timeout_s, tuple(args), dict(env or {}))
    procs = [
        ctx.Process(target=_rank_main, args=(fn, rank, *rank_args, results), name=f"rank{rank}")
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    by_rank: dict[int, Any] = {}
    try:
        _collect(procs, results, by_rank, time.monotonic() + timeout_s, timeout_s)
    finally:
        _stop(procs, finished=len(by_rank) == world_size)
    ordered = [by_rank[r] for r in range(world_size)]
    failures = [v for v in ordered if isinstance(v, RankFailure)]
    if failures and not return_exceptions:
        raise RanksFailedError(failures)
    return ordered


def _collect(
    procs: list[Any], results: ProcessQueue[tuple[int, Any]], by_rank: dict[int, Any], deadline: float, timeout_s: float
) -> None:
    """Fill ``by_rank`` with every rank's result; raise when the deadline passes or a rank died
    without reporting (segfault, ``os._exit``)."""
    while len(by_rank) < len(procs):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            missing = sorted(set(range(len(procs))) - set(by_rank))
            raise TimeoutError(f"ranks {missing} did not finish within {timeout_s:.0f} s (killed)")
        try:
            rank, value = results.get(timeout=min(remaining, 1.0))
            by_rank[rank] = value
            continue
        except queue.Empty:
            pass
        dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in by_rank]
        if dead:
            time.sleep(0.5)  # its report may still be in flight
            while not results.empty():
                rank, value = results.get()
                by_rank[rank] = value
            dead = [r for r in dead if r not in by_rank]
        if dead:
            codes = {r: procs[r].exitcode for r in dead}
            raise RuntimeError(f"ranks exited without a result (exit codes {codes})")


def _stop(procs: list[Any], *, finished: bool) -> None:
    """Join the rank processes (briefly when the run failed), then kill those still alive --
    only the processes this launcher started."""
    for p in procs:
        p.join(timeout=30 if finished else 0.1)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    backend: str,
    port: int,
    timeout_s: float,
    args: tuple[Any, ...],
    env: dict[str, str],
    results: ProcessQueue[tuple[int, Any]],
) -> None:
    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank)})
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
        device_id = None
        if backend == "nccl":
            torch.cuda.set_device(rank)
            # eager NCCL init: DeepEP reuses the communicator, which must exist before it asks
            device_id = torch.device("cuda", rank)
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timeout, device_id=device_id
        )
    except BaseException as exc:  # report instead of leaving the launcher waiting
        results.put((rank, _failure(rank, exc)))
        return
    try:
        value = fn(dist.group.WORLD, *args)
    except BaseException as exc:
        value = _failure(rank, exc)
    finally:
        run_teardown()
    results.put((rank, value))
    try:
        dist.destroy_process_group()
    except Exception:  # a group broken by a failed collective cannot always be torn down
        pass


def _failure(rank: int, exc: BaseException) -> RankFailure:
    return RankFailure(rank, type(exc).__name__, str(exc), traceback.format_exc())

"""Expert parallelism across processes: launching ranks, agreeing on a layer, expert ownership.

* :func:`run_ranks` starts one process per rank (``torch.multiprocessing``, spawn), joins them
  into a process group and returns what each rank's function returned -- for tests and
  benchmarks (``torchrun`` without the launcher). A rank that hangs is killed at a deadline.
* :func:`check_agreement` gathers a few integers from every rank once and raises the same
  ``ValueError`` on every rank when they differ, instead of letting a mismatched collective hang.
* :func:`at_teardown` registers what a rank must release while its process group still exists
  (DeepEP's buffers hold NCCL windows); :func:`run_ranks` runs those hooks before tearing down.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import queue
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# --- launching ranks ---------------------------------------------------------------------


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
    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=timeout_s)
    )
    results: queue.Queue = ctx.Queue()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(
                fn,
                rank,
                world_size,
                backend,
                store.port,
                collective_timeout_s or timeout_s,
                tuple(args),
                dict(env or {}),
                results,
            ),
            name=f"rank{rank}",
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    by_rank: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(by_rank) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(by_rank))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout_s:.0f} s (killed)")
            try:
                rank, value = results.get(timeout=min(remaining, 1.0))
                by_rank[rank] = value
                continue
            except queue.Empty:
                pass
            # a rank that died without reporting (segfault, os._exit) fails the run now
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
    finally:
        for p in procs:
            p.join(timeout=30 if len(by_rank) == world_size else 0.1)
        for p in procs:
            if p.is_alive():  # only the processes started above
                p.kill()
                p.join(timeout=5)
    ordered = [by_rank[r] for r in range(world_size)]
    failures = [v for v in ordered if isinstance(v, RankFailure)]
    if failures and not return_exceptions:
        raise RanksFailedError(failures)
    return ordered


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    backend: str,
    port: int,
    timeout_s: float,
    args: tuple[Any, ...],
    env: dict[str, str],
    results: queue.Queue,
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


_TEARDOWN: list[Callable[[], None]] = []


def at_teardown(hook: Callable[[], None]) -> None:
    """Run ``hook`` (once) before this process's group is destroyed by :func:`run_ranks`, or by
    a caller of :func:`run_teardown`. Registering the same hook twice runs it once."""
    if hook not in _TEARDOWN:
        _TEARDOWN.append(hook)


def run_teardown() -> None:
    """Run the registered hooks, newest first; call before ``dist.destroy_process_group()``."""
    while _TEARDOWN:
        _TEARDOWN.pop()()


# --- agreement between ranks ---------------------------------------------------------------

#: dtypes a fingerprint may carry, encoded by position
_DTYPE_CODES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int32,
    torch.int64,
    torch.float8_e4m3fn,
)


def group_backend(group: Any) -> str:
    """The backend name(s) of a process group ("gloo", "nccl", "cpu:gloo,cuda:nccl"), or
    "unknown" for an object that is not a registered group."""
    try:
        return str(dist.get_backend(group))
    except Exception:  # unregistered groups (and test doubles) answer through name()
        try:
            return str(group.name())
        except Exception:
            return "unknown"


def backend_device(group: Any) -> torch.device:
    """Where a group's collectives take their tensors: the current GPU for NCCL, else the CPU."""
    if "nccl" in group_backend(group) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _encode(value: int | bool | torch.dtype) -> int:
    if isinstance(value, torch.dtype):
        return _DTYPE_CODES.index(value)
    return int(value)


def _decode(code: int, kind: type) -> str:
    """A gathered code as the value it encodes (``kind``: the type of the value sent)."""
    if kind is torch.dtype and 0 <= code < len(_DTYPE_CODES):
        return str(_DTYPE_CODES[code]).removeprefix("torch.")
    if kind is bool:
        return str(bool(code))
    return str(code)


def check_agreement(group: Any, what: str, fields: Mapping[str, int | bool | torch.dtype]) -> None:
    """Gather ``fields`` from every rank of ``group`` (one small all_gather, one host sync) and
    raise ``ValueError`` on every rank, naming each disagreeing field and which ranks hold which
    value, when they differ. Every rank must call it with the same field names in the same order.
    """
    names = list(fields)
    kinds = [type(fields[n]) for n in names]
    local = torch.tensor([_encode(fields[n]) for n in names], dtype=torch.int64, device=backend_device(group))
    world = group.size()
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    table = torch.stack(gathered).cpu().tolist()
    problems = []
    for j, name in enumerate(names):
        ranks_by_value: dict[int, list[int]] = {}
        for r, row in enumerate(table):
            ranks_by_value.setdefault(row[j], []).append(r)
        if len(ranks_by_value) > 1:
            held = "; ".join(
                f"{_decode(v, kinds[j])} on rank{'s' if len(rs) > 1 else ''} {','.join(map(str, rs))}"
                for v, rs in sorted(ranks_by_value.items(), key=lambda kv: kv[1][0])
            )
            problems.append(f"{name}: {held}")
    if problems:
        raise ValueError(f"{what}: the ranks disagree on the layer: " + " | ".join(problems))

"""What the ranks of an expert-parallel layer share in one process group.

* :func:`check_agreement` gathers a few integers from every rank once and raises the same
  ``ValueError`` on every rank when they differ, instead of letting a mismatched collective hang.
* :func:`at_teardown` registers what a rank must release while its process group still exists
  (DeepEP's buffers hold NCCL windows); whoever destroys the group calls :func:`run_teardown`
  first (the launcher :func:`moe_kernels.tools.launcher.run_ranks` does).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

# --- teardown hooks ------------------------------------------------------------------------

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

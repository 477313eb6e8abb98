"""Test setup: Triton kernels run under the interpreter when there is no GPU, and GPU tests
skip cleanly without one."""

import os
import tempfile

import pytest
import torch

# Tuning on first use measures the GPU (minutes over a whole suite) and writes a user cache: the
# tests pin selection to the shipped tables; tests of the first-use tuner turn it on themselves.
os.environ.setdefault("MOE_KERNELS_TUNE", "0")
# ... and never read a first-use cache the developer's own runs left in ~/.cache
os.environ.setdefault("MOE_KERNELS_CACHE", tempfile.mkdtemp(prefix="moe-kernels-cache-"))

if not torch.cuda.is_available():
    # must happen before triton is imported anywhere
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_multi = pytest.mark.skip(reason="needs two or more CUDA GPUs")
    for item in items:
        if "gpu" in item.keywords and gpus == 0:
            item.add_marker(skip_gpu)
        if "multigpu" in item.keywords and gpus < 2:
            item.add_marker(skip_multi)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@pytest.fixture(autouse=True)
def _own_workspace_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's layers share a fresh default workspace cache: a CUDA graph an earlier test
    captured pins the buffers it wrote, and a later test's larger layer must not need them to grow."""
    from moe_kernels.core import compose

    monkeypatch.setattr(compose, "default_workspace_cache", compose.WorkspaceCache())

"""Layer configuration: MoE shape, parallelism and quantization (pydantic v2, strict).

A YAML file in ``configs/`` holds one :class:`LayerConfig`::

    moe: {num_experts: 256, top_k: 8, hidden_size: 7168, intermediate_size: 2048, ...}
    parallel: {ep_size: 8}
    quant: {}
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, model_validator

_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


def _to_dtype(value: Any) -> torch.dtype:
    if isinstance(value, torch.dtype):
        if value not in _DTYPES.values():
            raise ValueError(f"dtype must be one of bfloat16, float16, float32; got {value}")
        return value
    if isinstance(value, str):
        key = value.removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
    raise ValueError(f"dtype must be a torch.dtype or one of {sorted(_DTYPES)}; got {value!r}")


TorchDtype = Annotated[
    torch.dtype,
    BeforeValidator(_to_dtype),
    PlainSerializer(lambda d: str(d).removeprefix("torch."), return_type=str),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class MoEConfig(_Strict):
    """The shape of one MoE layer (global, before expert parallelism)."""

    num_experts: int = Field(gt=0, description="routed experts in the whole model layer")
    top_k: int = Field(gt=0, description="experts each token is routed to")
    hidden_size: int = Field(gt=0, description="H: model width; a multiple of 8")
    intermediate_size: int = Field(gt=0, description="I: each expert's MLP width")
    dtype: TorchDtype = torch.bfloat16
    activation: Literal["silu"] = "silu"
    renormalize: bool = True
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    num_expert_group: int | None = Field(default=None, gt=0)
    topk_group: int | None = Field(default=None, gt=0)
    routed_scaling_factor: float = Field(default=1.0, gt=0)
    max_tokens_per_chunk: int | None = Field(
        default=None, gt=0, description="chunk larger batches to bound workspace memory (local only)"
    )

    @model_validator(mode="after")
    def _check(self) -> MoEConfig:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if self.hidden_size % 8:
            raise ValueError(f"hidden_size must be a multiple of 8 (16-byte rows); got {self.hidden_size}")
        if self.intermediate_size % 8:
            raise ValueError(f"intermediate_size must be a multiple of 8; got {self.intermediate_size}")
        if (self.num_expert_group is None) != (self.topk_group is None):
            raise ValueError("num_expert_group and topk_group must be given together")
        if self.num_expert_group is not None:
            assert self.topk_group is not None
            if self.num_experts % self.num_expert_group:
                raise ValueError(
                    f"num_experts ({self.num_experts}) must be divisible by num_expert_group ({self.num_expert_group})"
                )
            if self.topk_group > self.num_expert_group:
                raise ValueError(
                    f"topk_group ({self.topk_group}) must be <= num_expert_group ({self.num_expert_group})"
                )
            per_group = self.num_experts // self.num_expert_group
            if self.top_k > self.topk_group * per_group:
                raise ValueError(
                    f"top_k ({self.top_k}) exceeds the experts in topk_group groups ({self.topk_group} x {per_group})"
                )
        return self


class ParallelConfig(_Strict):
    """Expert parallelism: this rank holds experts [ep_rank * E/ep_size, (ep_rank+1) * E/ep_size)."""

    ep_size: int = Field(default=1, gt=0)
    ep_rank: int = Field(default=0, ge=0)
    dp_size: int = Field(default=1, gt=0)
    max_tokens_per_rank: int = Field(default=8192, gt=0, description="largest token count any rank passes to one call")
    cuda_graphs: bool = Field(default=False, description="the layer will be captured in CUDA graphs")

    @model_validator(mode="after")
    def _check(self) -> ParallelConfig:
        if self.ep_rank >= self.ep_size:
            raise ValueError(f"ep_rank ({self.ep_rank}) must be < ep_size ({self.ep_size})")
        return self


class QuantScheme(str, enum.Enum):
    NONE = "none"  # activations and weights in MoEConfig.dtype


class QuantConfig(_Strict):
    """Quantization of the expert weights and activations (only unquantized today)."""

    scheme: QuantScheme = QuantScheme.NONE


class LayerConfig(_Strict):
    """Everything that decides which kernels may run a layer."""

    name: str | None = Field(default=None, description="a label, e.g. the model's name")
    moe: MoEConfig
    parallel: ParallelConfig = ParallelConfig()
    quant: QuantConfig = QuantConfig()

    @model_validator(mode="after")
    def _check(self) -> LayerConfig:
        if self.moe.num_experts % self.parallel.ep_size:
            raise ValueError(
                f"num_experts ({self.moe.num_experts}) must be divisible by ep_size ({self.parallel.ep_size})"
            )
        return self

    @property
    def num_local_experts(self) -> int:
        return self.moe.num_experts // self.parallel.ep_size


def load_config(path: str | Path, **overrides: Any) -> LayerConfig:
    """Read a :class:`LayerConfig` from YAML; ``overrides`` replace top-level sections
    (e.g. ``parallel=ParallelConfig(ep_size=8)``)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with 'moe', 'parallel', 'quant'; got {type(data).__name__}")
    data.update(overrides)
    return LayerConfig.model_validate(data)

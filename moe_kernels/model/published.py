"""Quantized expert tensors as checkpoints publish them -> the stored tensors of our formats
(:mod:`moe_kernels.mlp.formats`), repacked once at load.

Each function takes one projection of one expert (or, gpt-oss, of all experts) in its published
layout, checks it (shapes against the config, dtypes, scales finite and positive, zero points
only where the scheme has them) and returns ``{"weight", "scale"[, "zero"]}`` as the format
stores them. Published layouts (facts from the formats' descriptions):

* compressed-tensors / ModelOpt FP8: ``weight [N, K] float8_e4m3fn``, ``weight_scale`` ``[N, 1]``
  (or ``[N]``) per channel, ``[]``/``[1]`` per tensor; ``input_scale`` (a static activation
  scale) is accepted and not used: our activations are quantized dynamically per token and 128
  columns, which is finer.
* GPTQ: ``qweight [K/8, N] int32`` (eight 4-bit values along K per word, the lowest first),
  ``qzeros [K/g, N/8] int32`` (along N), ``scales [K/g, N]``, ``g_idx [K]``; zero points stored
  minus one (AutoGPTQ's ``gptq`` checkpoint format: a symmetric layer stores 7).
* AWQ: ``qweight [K, N/8] int32`` and ``qzeros [K/g, N/8]`` packed along N in the order
  ``0, 2, 4, 6, 1, 3, 5, 7`` (nibble ``i`` holds column ``order[i]``), ``scales [K/g, N]``.
* compressed-tensors ``pack-quantized``: ``weight_packed [N, K/8] int32`` (along K, lowest
  first, signed values + 8), ``weight_scale [N, K/g]``, ``weight_shape [2]`` = ``(N, K)``.
* gpt-oss mxfp4: ``*_blocks [E, N, K/32, 16] uint8`` (our nibble order), ``*_scales [E, N, K/32]
  uint8``; ``gate_up`` rows alternate gate, up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from moe_kernels.config import QuantConfig
from moe_kernels.mlp import fp8, packed
from moe_kernels.mlp.formats import Fp8Channel, Fp8Tensor, Int4Group, Mxfp4
from moe_kernels.mlp.spec import ExpertMLP
from moe_kernels.mlp.weights import ExpertWeights
from moe_kernels.model.naming import MXFP4_SUFFIXES, PUBLISHED_OPTIONAL, PUBLISHED_PARTS, Fused, LayerNaming, PerExpert

Stored = dict[str, torch.Tensor]
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_SHIFTS = torch.arange(8, dtype=torch.int32) * 4
#: AWQ packs column ``order[i]`` of each group of 8 into nibble ``i``
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _dt(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _expect(name: str, t: object, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}), got {_dt(t)}")
    return t


def _positive_scales(name: str, scale: torch.Tensor) -> torch.Tensor:
    scale = scale.float()
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bool(bad.any()):
        raise ValueError(f"{name}: scales must be finite and positive; {int(bad.sum())} are not (e.g. {scale[bad][0]})")
    return scale


def unpack_words(words: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words holding eight 4-bit values each (the lowest nibble first) -> uint8 values,
    ``dim`` eight times longer."""
    nibbles = (words.to(torch.int32).unsqueeze(-1) >> _SHIFTS.to(words.device)) & 0xF
    nibbles = nibbles.movedim(-1, dim + 1 if dim >= 0 else dim)
    shape = list(words.shape)
    shape[dim] *= 8
    return nibbles.reshape(shape).to(torch.uint8)


def fp8_from_published(name: str, weight: torch.Tensor, weight_scale: torch.Tensor, fmt: Fp8Channel | Fp8Tensor,
                       n: int, k: int) -> Stored:  # fmt: skip
    """compressed-tensors / ModelOpt FP8 ``weight``/``weight_scale`` -> ``fmt``'s tensors."""
    _expect(f"{name}.weight", weight, (n, k), (fp8.FP8_DTYPE,))
    rows = n if isinstance(fmt, Fp8Channel) else 1
    if weight_scale.numel() != rows or weight_scale.dim() > 2:
        raise ValueError(
            f"{name}.weight_scale: expected {rows} scale(s) for {fmt.describe()}, got shape {list(weight_scale.shape)}"
        )
    scale = _positive_scales(f"{name}.weight_scale", weight_scale)
    return {"weight": weight.contiguous(), "scale": scale.reshape(rows, 1)}


def merge_tensor_scales(gate: Stored, up: Stored) -> tuple[Stored, Stored]:
    """Gate and up share w13's one scale (:class:`Fp8Tensor`): requantize both to the larger."""
    common = torch.maximum(gate["scale"], up["scale"])
    out = []
    for part in (gate, up):
        real = part["weight"].float() * part["scale"]
        q = (real / common).clamp(-fp8.FP8_MAX, fp8.FP8_MAX).to(fp8.FP8_DTYPE)
        out.append({"weight": q, "scale": common.clone()})
    return out[0], out[1]


def _int4_stored(name: str, u: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, fmt: Int4Group) -> Stored:
    """``u [N, K]`` nibbles, ``scales``/``zeros [N, K/g]`` -> our packed tensors (checks zeros)."""
    stored = {"weight": packed.pack_nibbles(u), "scale": _positive_scales(f"{name}_scale", scales).contiguous()}
    if fmt.symmetric:
        if bool((zeros != packed.INT4_SYMMETRIC_ZERO).any()):
            raise ValueError(f"{name}: zero points other than {packed.INT4_SYMMETRIC_ZERO} on a symmetric scheme "
                             "(set quant.symmetric: false)")  # fmt: skip
    else:
        stored["zero"] = zeros.to(torch.uint8).contiguous()
    return stored


def int4_from_gptq(name: str, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   g_idx: torch.Tensor | None, fmt: Int4Group, n: int, k: int) -> Stored:  # fmt: skip
    """GPTQ ``qweight``/``qzeros``/``scales``/``g_idx`` -> ``fmt``'s tensors. Act-order
    (``g_idx`` other than ``k // group``) is refused: it permutes K, which our GEMMs would have
    to apply to the activations."""
    g = fmt.group_size
    _expect(f"{name}.qweight", qweight, (k // 8, n), (torch.int32,))
    _expect(f"{name}.qzeros", qzeros, (k // g, n // 8), (torch.int32,))
    _expect(f"{name}.scales", scales, (k // g, n), _SCALE_DTYPES)
    if g_idx is not None:
        _expect(f"{name}.g_idx", g_idx, (k,), (torch.int32, torch.int64))
        if not torch.equal(g_idx.long().cpu(), torch.arange(k) // g):
            raise ValueError(f"{name}.g_idx: act-order checkpoints (g_idx other than k // {g}) are not supported: "
                             "the permuted K would have to be applied to the activations")  # fmt: skip
    u = unpack_words(qweight, 0).t()
    zeros = unpack_words(qzeros, 1).t().int() + 1  # stored minus one
    return _int4_stored(name, u, scales.t().float(), zeros, fmt)


def _awq_unpack(words: torch.Tensor) -> torch.Tensor:
    """``[R, N/8] int32`` in AWQ's order -> ``[R, N]`` values."""
    nibbles = unpack_words(words, 1).reshape(words.shape[0], -1, 8)
    inverse = [AWQ_PACK_ORDER.index(j) for j in range(8)]
    return nibbles[..., inverse].reshape(words.shape[0], -1)


def int4_from_awq(name: str, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, fmt: Int4Group,
                  n: int, k: int) -> Stored:  # fmt: skip
    """AWQ ``qweight``/``qzeros``/``scales`` -> ``fmt``'s tensors (AWQ stores zero points)."""
    g = fmt.group_size
    _expect(f"{name}.qweight", qweight, (k, n // 8), (torch.int32,))
    _expect(f"{name}.qzeros", qzeros, (k // g, n // 8), (torch.int32,))
    _expect(f"{name}.scales", scales, (k // g, n), _SCALE_DTYPES)
    return _int4_stored(name, _awq_unpack(qweight).t(), scales.t().float(), _awq_unpack(qzeros).t(), fmt)


def int4_from_pack_quantized(name: str, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                             weight_shape: torch.Tensor, fmt: Int4Group, n: int, k: int) -> Stored:  # fmt: skip
    """compressed-tensors ``pack-quantized`` (symmetric) -> ``fmt``'s tensors."""
    if weight_shape.flatten().tolist() != [n, k]:
        raise ValueError(f"{name}.weight_shape: expected [{n}, {k}] (the config's), got {weight_shape.tolist()}")
    if not fmt.symmetric:
        raise ValueError(f"{name}: pack-quantized with zero points is not supported (quant.symmetric must be true)")
    _expect(f"{name}.weight_packed", weight_packed, (n, k // 8), (torch.int32,))
    _expect(
        f"{name}.weight_scale", weight_scale, (n, k // fmt.group_size), (torch.float16, torch.bfloat16, torch.float32)
    )
    u = unpack_words(weight_packed, 1)
    return _int4_stored(name, u, weight_scale.float(), torch.full_like(weight_scale, 8, dtype=torch.int32), fmt)


def mxfp4_from_gpt_oss(name: str, blocks: torch.Tensor, scales: torch.Tensor, e: int, n: int, k: int,
                       interleaved: bool) -> Stored:  # fmt: skip
    """gpt-oss ``*_blocks``/``*_scales`` of all experts -> :class:`Mxfp4` tensors ``[E, N, ...]``
    (``interleaved``: rows alternate gate, up; ours are gate rows, then up rows)."""
    groups = k // packed.MXFP4_GROUP
    _expect(f"{name}_blocks", blocks, (e, n, groups, packed.MXFP4_GROUP // 2), (torch.uint8,))
    _expect(f"{name}_scales", scales, (e, n, groups), (torch.uint8,))
    weight, scale = blocks.reshape(e, n, k // 2), scales
    if interleaved:
        order = torch.cat((torch.arange(0, n, 2), torch.arange(1, n, 2))).to(blocks.device)
        weight, scale = weight[:, order], scale[:, order]
    return {"weight": weight.contiguous(), "scale": scale.contiguous()}


def _projection(kind: str, name: str, parts: dict[str, torch.Tensor], fmt: object, n: int, k: int) -> Stored:
    """One projection's published ``parts`` (:data:`~moe_kernels.model.naming.PUBLISHED_PARTS`)."""
    if kind == "fp8" and isinstance(fmt, Fp8Channel | Fp8Tensor):
        return fp8_from_published(name, parts["weight"], parts["weight_scale"], fmt, n, k)
    if isinstance(fmt, Int4Group):
        if kind == "gptq":
            return int4_from_gptq(
                name, parts["qweight"], parts["qzeros"], parts["scales"], parts.get("g_idx"), fmt, n, k
            )
        if kind == "awq":
            return int4_from_awq(name, parts["qweight"], parts["qzeros"], parts["scales"], fmt, n, k)
        if kind == "pack-quantized":
            return int4_from_pack_quantized(
                name, parts["weight_packed"], parts["weight_scale"], parts["weight_shape"], fmt, n, k
            )
    raise ValueError(f"{name}: a {kind} checkpoint does not load into {getattr(fmt, 'describe', lambda: fmt)()}")


def _parts(tensors: Mapping[str, torch.Tensor], module: str, kind: str) -> dict[str, torch.Tensor]:
    missing = [f"{module}.{p}" for p in PUBLISHED_PARTS[kind] if f"{module}.{p}" not in tensors]
    if missing:
        raise ValueError(f"{kind} checkpoint: missing {', '.join(missing)}")
    names = (*PUBLISHED_PARTS[kind], *PUBLISHED_OPTIONAL.get(kind, ()))
    return {p: tensors[f"{module}.{p}"] for p in names if f"{module}.{p}" in tensors}


def _expert(tensors: Mapping[str, torch.Tensor], experts: PerExpert, e: int, kind: str, mlp: ExpertMLP) -> list[Stored]:
    """Expert ``e``'s ``[w13, w2]`` stored tensors (gate rows, then up rows)."""
    h, i = mlp.hidden, mlp.inter
    shapes = {"gate": (i, h), "up": (i, h), "down": (h, i)}
    stored = {}
    for role, (n, k) in shapes.items():
        module = getattr(experts, role).format(e=e).removesuffix(".weight")
        stored[role] = _projection(kind, module, _parts(tensors, module, kind), mlp.weights, n, k)
    gate, up = stored["gate"], stored["up"]
    if isinstance(mlp.weights, Fp8Tensor):
        gate, up = merge_tensor_scales(gate, up)
        w13 = {"weight": torch.cat((gate["weight"], up["weight"])), "scale": gate["scale"]}
    else:
        w13 = {part: torch.cat((gate[part], up[part])) for part in gate}
    return [w13, stored["down"]]


def published_expert_weights(tensors: Mapping[str, torch.Tensor], root: str, naming: LayerNaming, kind: str,
                             mlp: ExpertMLP, experts: Sequence[int]) -> ExpertWeights:  # fmt: skip
    """The ``experts`` (global ids, in local order) of the layer under ``root`` (``model.layers.3.``)
    from a checkpoint's ``tensors`` published as ``kind`` (a key of
    :data:`~moe_kernels.model.naming.PUBLISHED_PARTS`, or ``"mxfp4"`` for gpt-oss), repacked into
    ``mlp.weights``' layout. Raises ``ValueError``/``TypeError`` naming the tensor before anything
    is computed."""
    scoped = {key.removeprefix(root): t for key, t in tensors.items() if key.startswith(root)}
    if kind == "mxfp4":
        return _gpt_oss_experts(scoped, naming, mlp, experts)
    if not isinstance(naming.experts, PerExpert):
        raise ValueError(f"a {kind} checkpoint stores one module per expert; this naming stacks the experts")
    try:
        per_expert = [_expert(scoped, naming.experts, e, kind, mlp) for e in experts]
    except (ValueError, TypeError) as err:
        raise type(err)(f"layer {root.rstrip('.')}: {err}") from None
    stacked = [{part: torch.stack([p[j][part] for p in per_expert]) for part in per_expert[0][j]} for j in (0, 1)]
    w13, w2 = stacked
    return ExpertWeights(w13["weight"], w2["weight"], w13["scale"], w2["scale"], mlp.weights,
                         w13_zero=w13.get("zero"), w2_zero=w2.get("zero"))  # fmt: skip


def _gpt_oss_experts(
    tensors: Mapping[str, torch.Tensor], naming: LayerNaming, mlp: ExpertMLP, experts: Sequence[int]
) -> ExpertWeights:
    fused = naming.experts
    if not isinstance(mlp.weights, Mxfp4) or not isinstance(fused, Fused) or fused.gate_up is None:
        raise ValueError("an mxfp4 checkpoint loads into an mxfp4 layer with a stacked gate_up naming (gpt-oss)")
    h, i = mlp.hidden, mlp.inter
    out = []
    for stack, n, k, interleaved in ((fused.gate_up, 2 * i, h, fused.interleaved), (fused.down, h, i, False)):
        keys = [stack.key + suffix for suffix in MXFP4_SUFFIXES]
        missing = [key for key in keys if key not in tensors]
        if missing:
            raise ValueError(f"an mxfp4 checkpoint: missing {', '.join(missing)}")
        blocks, scales = (tensors[key] for key in keys)
        e = blocks.shape[0]
        stored = mxfp4_from_gpt_oss(stack.key, blocks, scales, e, n, k, interleaved)
        index = torch.tensor(list(experts), device=blocks.device)
        out.append({part: t[index].contiguous() for part, t in stored.items()})
    return ExpertWeights(out[0]["weight"], out[1]["weight"], out[0]["scale"], out[1]["scale"], mlp.weights)


# --- the scheme a checkpoint's quantization_config declares -------------------------------------


def _int4(q: Mapping[str, Any], bits: object, group: object, symmetric: bool) -> QuantConfig:
    if bits != 4:
        raise ValueError(f"{bits}-bit weights (int4_w4a16 takes 4)")
    if not isinstance(group, int) or isinstance(group, bool):
        raise ValueError(f"group_size {group!r} (int4_w4a16 takes a whole number)")
    return QuantConfig(scheme="int4_w4a16", group_size=group, symmetric=symmetric)


def _compressed_tensors(q: Mapping[str, Any]) -> QuantConfig:
    groups = list((q.get("config_groups") or {}).values())
    weights = [g.get("weights") or {} for g in groups]
    if len(weights) != 1:
        raise ValueError(f"{len(weights)} config_groups (one is implemented)")
    w = weights[0]
    kind, bits, strategy = w.get("type"), w.get("num_bits"), w.get("strategy")
    if kind == "int" and q.get("format") == "pack-quantized" and strategy == "group":
        return _int4(q, bits, w.get("group_size"), bool(w.get("symmetric", True)))
    if kind == "float" and bits == 8 and strategy in ("channel", "tensor", "block"):
        scheme = {"channel": "fp8_w8a8_channel", "tensor": "fp8_w8a8_tensor", "block": "fp8_w8a8_block"}[strategy]
        return QuantConfig(scheme=scheme)  # type: ignore[arg-type]
    raise ValueError(f"weights {kind} {bits}-bit, strategy {strategy!r}, format {q.get('format')!r}")


def quant_from_hf(q: Mapping[str, Any]) -> QuantConfig:
    """The scheme of a transformers ``quantization_config`` (GPTQ, AWQ, compressed-tensors,
    ModelOpt FP8, gpt-oss mxfp4); ``ValueError`` saying what is not implemented."""
    method = q.get("quant_method")
    if method == "gptq":
        if q.get("desc_act"):
            raise ValueError("desc_act (act-order) permutes K, which the GEMMs would have to apply to the activations")
        return _int4(q, q.get("bits"), q.get("group_size", 128), bool(q.get("sym", True)))
    if method == "awq":
        if q.get("version", "gemm") != "gemm":
            raise ValueError(f"AWQ version {q.get('version')!r} (the GEMM packing is implemented)")
        group = q.get("group_size", q.get("q_group_size", 128))
        return _int4(q, q.get("bits", q.get("w_bit")), group, not q.get("zero_point", True))
    if method == "compressed-tensors":
        return _compressed_tensors(q)
    if method == "modelopt" and str(q.get("quant_algo", "")).upper() == "FP8":
        return QuantConfig(scheme="fp8_w8a8_tensor")
    if method == "mxfp4":
        return QuantConfig(scheme="mxfp4")
    raise ValueError(f"quant_method {method!r} is not one moe_kernels reads")

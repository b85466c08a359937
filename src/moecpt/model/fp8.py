"""FP8 block-quantised checkpoints (DeepSeek-V3/R1 on the hub): a weight stored as float8_e4m3fn with a
`*.weight_scale_inv` [ceil(rows / br), ceil(cols / bc)] of fp32 scales, one per block of br x bc elements
(`quantization_config.weight_block_size`, [128, 128] for DeepSeek). The value is weight x scale of its block.

Dequantised in fp32 and rounded once to the training dtype, as transformers' FP8 loader does
(`Fp8Dequantize` with dequantize=True), with the partial blocks at the right and bottom edges of shapes that
the block size does not divide (DeepSeek-V3's kv_a_proj_with_mqa has 576 rows) taking their own block's scale.
moecpt trains and exports the dequantised weights; it writes no FP8.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from moecpt.errors import UserError

FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
DEFAULT_BLOCK = (128, 128)


def block_size(quantization_config: dict[str, Any] | None, source: str = "config.json") -> tuple[int, int] | None:
    """The FP8 block size of a config.json's `quantization_config` (None: the checkpoint is not quantised);
    other quantisation methods are refused."""
    if not quantization_config:
        return None
    method = quantization_config.get("quant_method")
    if method != "fp8":
        raise UserError(f"{source}: quantization_config.quant_method {method!r} is not supported (moecpt reads "
                        "block-wise fp8 checkpoints; dequantise others with their own tools first)")
    block = quantization_config.get("weight_block_size") or DEFAULT_BLOCK
    if len(block) != 2 or min(int(b) for b in block) <= 0:
        raise UserError(f"{source}: quantization_config.weight_block_size must be two positive sizes, got {block}")
    return int(block[0]), int(block[1])


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """The shape of the `weight_scale_inv` of a weight of `shape`."""
    return (*shape[:-2], math.ceil(shape[-2] / block[0]), math.ceil(shape[-1] / block[1]))


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
               dtype: torch.dtype = torch.float32, name: str = "weight") -> torch.Tensor:
    """weight x the scale of its block, computed in fp32 and rounded once to `dtype`."""
    if tuple(scale_inv.shape) != scale_shape(tuple(weight.shape), block):
        raise UserError(f"{name}_scale_inv has shape {tuple(scale_inv.shape)}; a {tuple(weight.shape)} weight in "
                        f"{block[0]}x{block[1]} blocks needs {scale_shape(tuple(weight.shape), block)}")
    return dequantize_part(weight, scale_inv, block, (0, 0), dtype)


def scale_region(region: tuple[slice, slice], block: tuple[int, int]) -> tuple[slice, slice]:
    """The blocks of `weight_scale_inv` that cover `region` (rows, columns; explicit bounds, steps of 1) of the
    weight: what a sharded load reads of the scales for its part of the weight."""
    return tuple(slice(r.start // b, -(-r.stop // b)) for r, b in zip(region, block, strict=True))


def dequantize_part(weight_part: torch.Tensor, scale_part: torch.Tensor, block: tuple[int, int],
                    start: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The part of a weight whose last two dims begin at row, column `start`, dequantised with the scales of the
    blocks that cover it (`scale_region`): the same numbers as `dequantize` gives there."""
    rows, cols = weight_part.shape[-2:]
    r0, c0 = start[0] % block[0], start[1] % block[1]
    scale = scale_part.to(torch.float32)
    scale = scale.repeat_interleave(block[0], dim=-2)[..., r0:r0 + rows, :]
    scale = scale.repeat_interleave(block[1], dim=-1)[..., c0:c0 + cols]
    return (weight_part.to(torch.float32) * scale).to(dtype)


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype in FP8_DTYPES

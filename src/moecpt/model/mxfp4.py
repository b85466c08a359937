"""MXFP4 (OCP microscaling FP4), the format of gpt-oss's published expert weights: blocks of 32 values share
one power-of-two scale. A block is 16 bytes, two 4-bit E2M1 codes per byte (the low nibble is the earlier
value); a scale is a biased exponent byte (value = code x 2^(scale - 127)).

`dequantize_mxfp4` gives the same numbers as transformers' `convert_moe_packed_tensors`, laid out the same
way: blocks [E, R, G, 16] and scales [E, R, G] become [E, G * 32, R] (each expert's matrix transposed, as
transformers' gpt-oss experts hold it). Every E2M1 value times a power of two is exact in fp32, so
dequantising in fp32 and casting once to bf16 equals dequantising in bf16.
"""

from __future__ import annotations

import torch

from moecpt.errors import UserError

BLOCK = 32  # values per scale
# The 16 E2M1 codes: sign bit, 2 exponent bits, 1 mantissa bit.
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """blocks [*prefix, R, G, 16] uint8 and scales [*prefix, R, G] uint8 -> [prefix0, G * 32, R, ...] in
    `dtype` (the last two dims of the unpacked [*prefix, R, G * 32] swapped with dim 1, transformers' layout)."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise UserError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not fit "
                        f"together (blocks are [..., G, {BLOCK // 2}] bytes, scales [..., G])")
    table = torch.tensor(E2M1, dtype=torch.float32, device=blocks.device)
    packed = blocks.to(torch.uint8)
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)  # [..., G, 32], low nibble first
    values = table[codes.long()]
    # code x 2^(scale - 127) by ldexp on the values, as transformers computes it (no separate power of two,
    # which would overflow at scale 255 where the product does not).
    out = torch.ldexp(values, scales.to(torch.int32)[..., None] - 127).to(dtype).flatten(-2)  # [*prefix, R, G*32]
    return out.transpose(1, 2).contiguous()

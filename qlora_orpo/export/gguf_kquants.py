"""Q4_K, Q5_K and Q6_K block quantisation in numpy, byte for byte as llama.cpp's reference quantisers.

The ``gguf`` package quantises only the 32-weight types (Q4_0 ... Q8_0) and dequantises the
K-quants; llama.cpp's ``llama-quantize`` is C++. This module ports ``quantize_row_q4_K_ref``,
``quantize_row_q5_K_ref`` and ``quantize_row_q6_K_ref`` of ``ggml/src/ggml-quants.c`` (with their
helpers ``make_qkx2_quants``, ``make_qx_quants`` and ``nearest_int``), which are what
``llama_model_quantize`` runs when no importance matrix is given. The layouts are those of
``block_q4_K``/``block_q5_K``/``block_q6_K`` and read back with ``gguf.quants.dequantize``.

Why the loops look the way they do: the reference accumulates every sum left to right in float32
and compares candidate errors with ``<``, so a sum in another order (numpy's pairwise ``sum``)
can flip a choice and change bytes. Each group of 16 or 32 weights is therefore held
element-major, ``(n, groups)``, and summed with an explicit loop over its ``n`` elements, each
step one vectorised add over all groups; every scalar is a ``np.float32`` so that no product is
widened to float64 on the way.

A super-block is ``QK_K = 256`` weights of one row:

* Q4_K (144 bytes): ``d``, ``dmin`` (f16), 12 bytes of eight 6-bit scales and mins, 128 bytes
  of 4-bit codes; weight = ``d * sc * q - dmin * m`` per group of 32.
* Q5_K (176 bytes): as Q4_K plus 32 bytes holding each code's fifth bit.
* Q6_K (210 bytes): 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales, ``d``;
  weight = ``d * sc * (q - 32)`` per group of 16.
"""

from __future__ import annotations

from typing import Any

import numpy as np

QK_K = 256
GROUP_MAX_EPS = np.float32(1e-15)  # below this |max| a group is all zeros (ggml-quants.c)
CHUNK_BLOCKS = 1024  # super-blocks per vectorised pass: temporaries of 1 MB stay in cache
F32 = np.float32


def nearest_int(v: np.ndarray) -> np.ndarray:
    """Round to nearest (ties to even) as ggml does: add 1.5 * 2**23 in float32 and read the mantissa.

    The bit trick, not ``np.rint``, so that NaN and infinities give what the C code gives (0 and
    -2**22) rather than undefined integer casts.
    """
    with np.errstate(invalid="ignore", over="ignore"):
        bits = (np.asarray(v, dtype=F32) + F32(12582912.0)).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def _levels(v: np.ndarray, low: int, high: int) -> np.ndarray:
    """``clamp(nearest_int(v), low, high)`` as float32, for ``v`` the reference keeps within ``|v| < 2**22``.

    ``np.rint`` rounds half to even like :func:`nearest_int` there, in half the array passes; the
    callers' ``v`` stay within a few steps of the code range (scales come from the data's own range).
    """
    out = np.rint(v)
    return np.clip(out, low, high, out=out)


def _fp16(v: np.ndarray) -> np.ndarray:
    """``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v))``: round to half (nearest even), back to float32."""
    return np.asarray(v, dtype=F32).astype(np.float16).astype(F32)


def _seq_sum(a: np.ndarray) -> np.ndarray:
    """``a (n, groups)`` summed over ``n`` left to right in float32, as the reference's loops do."""
    total = a[0].copy()
    for row in a[1:]:
        total += row
    return total


def _element_major(blocks: np.ndarray, n: int) -> np.ndarray:
    """``blocks (B, 256)`` -> ``(n, B * 256 / n)``: element ``i`` of every group of ``n`` in one contiguous row."""
    return np.ascontiguousarray(blocks.reshape(-1, n).T)


def _block_major(codes: np.ndarray, n_blocks: int) -> np.ndarray:
    """Inverse of :func:`_element_major`: ``(n, groups)`` -> ``(B, 256)``."""
    return np.ascontiguousarray(codes.T).reshape(n_blocks, QK_K)


# ---------------------------------------------------------------------------------------------
# The helpers of ggml-quants.c, each over many groups at once
# ---------------------------------------------------------------------------------------------


def make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float,
                     nstep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale, min and codes of groups ``x (n, G)`` with weights ``w (n, G)``: ``x ~ scale * L - the_min``.

    Starts from the min-max fit, then tries ``nstep + 1`` stretched scales, each followed by the
    weighted least-squares fit of scale and (non-positive) min to its codes, and keeps the fit of
    least weighted squared error. Returns ``(scale (G,), the_min (G,), L (n, G) uint8)``.
    """
    x = x.astype(F32, copy=False)
    lo, hi = x.min(axis=0), x.max(axis=0)
    sum_w = _seq_sum(w)
    sum_x = _seq_sum(w * x)
    lo = np.where(lo > 0, F32(0), lo)  # the min is never positive: codes start at zero
    flat = hi == lo
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(nmax) / (hi - lo)
        scale = F32(1) / iscale
        codes = _levels(iscale * (x - lo), 0, nmax)
        diff = scale * codes + lo - x
        best = _seq_sum(w * (diff * diff))
        # In-place buffers: the loop is memory-bound, so no temporaries of (n, G) inside it.
        trial, work, wl = np.empty_like(x), np.empty_like(x), np.empty_like(x)
        for step in range(nstep + 1):
            # (rmin + rdelta*is) + nmax, each product and sum in float32 as written in C
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (hi - lo)
            np.subtract(x, lo, out=trial)
            trial *= iscale
            np.rint(trial, out=trial)  # as nearest_int: the values stay within a step of [0, nmax]
            np.clip(trial, 0, nmax, out=trial)
            np.multiply(w, trial, out=wl)
            sum_l = _seq_sum(wl)
            sum_l2 = _seq_sum(np.multiply(wl, trial, out=work))
            sum_xl = _seq_sum(np.multiply(wl, x, out=work))
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive = this_min > 0  # a positive min is refitted as zero with the scale alone
            this_min = np.where(positive, F32(0), this_min)
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            np.multiply(this_scale, trial, out=work)  # diff = this_scale * L + this_min - x
            work += this_min
            work -= x
            np.multiply(work, work, out=work)
            work *= w
            err = _seq_sum(work)
            better = (det > 0) & (err < best) & ~flat
            np.copyto(codes, trial, where=better)
            best = np.where(better, err, best)
            scale = np.where(better, this_scale, scale)
            lo = np.where(better, this_min, lo)
    codes = np.where(flat, 0, codes)
    scale = np.where(flat, F32(0), scale)
    return scale.astype(F32), (-lo).astype(F32), codes.astype(np.uint8)


def make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric scale and codes of groups ``x (n, G)`` (``rmse_type = 1``, no importance weights).

    Codes ``L`` in ``[0, 2 * nmax)`` stand for ``L - nmax``; the scale is the least-squares fit
    weighted by ``x**2``, the best of 19 trial scales. Returns ``(scale (G,), L (n, G) uint8)``.
    """
    x = x.astype(F32, copy=False)
    cols = np.arange(x.shape[1])
    peak = x[np.abs(x).argmax(axis=0), cols]  # the first largest |x|, sign kept, as the C loop finds it
    zero = np.abs(peak) < GROUP_MAX_EPS
    weight = x * x
    wx = weight * x

    work = np.empty_like(x)

    def fit(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        levels = _levels(iscale * x, -nmax, nmax - 1)
        sumlx = _seq_sum(np.multiply(wx, levels, out=work))
        np.multiply(weight, levels, out=work)  # (w * l) * l, the C order
        return levels, sumlx, _seq_sum(np.multiply(work, levels, out=work))

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        levels, sumlx, suml2 = fit(F32(-nmax) / peak)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        for step in (*range(-9, 0), *range(1, 10)):
            trial, slx, sl2 = fit(-(F32(nmax) + F32(0.1) * F32(step)) / peak)
            better = (sl2 > 0) & (slx * slx > best * sl2)
            np.copyto(levels, trial, where=better)
            scale = np.where(better, slx / sl2, scale)
            best = np.where(better, scale * slx, best)
    codes = np.where(zero, 0, levels + nmax).astype(np.uint8)
    return np.where(zero, F32(0), scale).astype(F32), codes


def _to_u8(v: np.ndarray) -> np.ndarray:
    """``int -> uint8_t`` as C converts it (modulo 256)."""
    return (v & 0xFF).astype(np.uint8)


def pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins ``(B, 8)`` into the 12 bytes ``get_scale_min_k4`` unpacks."""
    out = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return out


# ---------------------------------------------------------------------------------------------
# Super-block quantisers: (B, 256) float32 -> (B, type_size) uint8
# ---------------------------------------------------------------------------------------------


def _q45_k(blocks: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int) -> tuple[np.ndarray, ...]:
    """The shared body of Q4_K and Q5_K: ``(d, dmin, scales (B, 12), L (B, 256))``."""
    n_blocks = blocks.shape[0]
    x = _element_major(blocks, 32)
    av_x = np.sqrt(_seq_sum(x * x) / F32(32))
    scales, mins, codes = make_qkx2_quants(x, av_x + np.abs(x), nmax, rmin, rdelta, nstep)
    scales, mins = scales.reshape(n_blocks, 8), mins.reshape(n_blocks, 8)
    max_scale = np.maximum(scales.max(axis=1), F32(0))  # the C loop starts from 0 with a strict >
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
    ls = np.minimum(_to_u8(nearest_int(inv_scale[:, None] * scales)), 63)
    lm = np.minimum(_to_u8(nearest_int(inv_min[:, None] * mins)), 63)
    d, dmin = _fp16(max_scale / F32(63)), _fp16(max_min / F32(63))
    # Requantise against the stored (6-bit, f16) scales; a group whose scale rounds to 0 keeps its codes.
    step = (d[:, None] * ls.astype(F32)).reshape(-1)
    offset = (dmin[:, None] * lm.astype(F32)).reshape(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        again = np.clip(nearest_int((x + offset) / step), 0, nmax)
    codes = np.where(step != 0, again, codes).astype(np.uint8)
    return d, dmin, pack_scale_min_k4(ls, lm), _block_major(codes, n_blocks)


def quantize_q4_k_blocks(blocks: np.ndarray) -> np.ndarray:
    """``quantize_row_q4_K_ref`` on ``blocks (B, 256)``: ``(B, 144)`` bytes."""
    d, dmin, scales, codes = _q45_k(blocks, 15, -1.0, 0.1, 20)
    pairs = codes.reshape(-1, 4, 2, 32)  # 64 weights per 32 bytes: low nibble first 32, high next 32
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2),
                           dmin.astype(np.float16).view(np.uint8).reshape(-1, 2), scales, qs], axis=1)


def quantize_q5_k_blocks(blocks: np.ndarray) -> np.ndarray:
    """``quantize_row_q5_K_ref`` on ``blocks (B, 256)``: ``(B, 176)`` bytes."""
    d, dmin, scales, codes = _q45_k(blocks, 31, -0.5, 0.1, 15)
    pairs = codes.reshape(-1, 4, 2, 32)
    qs = ((pairs[:, :, 0] & 0xF) | ((pairs[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    # Fifth bits: group g of 32 (g = 0..7) goes to bit g of byte j for its j-th weight.
    qh = np.zeros((codes.shape[0], 32), dtype=np.uint8)
    for g in range(8):
        qh |= (pairs[:, g // 2, g % 2] >> 4) << g
    return np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2),
                           dmin.astype(np.float16).view(np.uint8).reshape(-1, 2), scales, qh, qs], axis=1)


def quantize_q6_k_blocks(blocks: np.ndarray) -> np.ndarray:
    """``quantize_row_q6_K_ref`` on ``blocks (B, 256)``: ``(B, 210)`` bytes."""
    n_blocks = blocks.shape[0]
    x = _element_major(blocks, 16)
    scales, codes = make_qx_quants(x, 32)
    scales = scales.reshape(n_blocks, 16)
    peak = scales[np.arange(n_blocks), np.abs(scales).argmax(axis=1)]  # first largest |scale|, sign kept
    zero = np.abs(peak) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(-128) / peak
        d = _fp16(F32(1) / iscale)
        sc = _to_u8(np.minimum(127, nearest_int(iscale[:, None] * scales))).view(np.int8)
        step = (d[:, None] * sc.astype(F32)).reshape(-1)
        again = np.clip(nearest_int(x / step), -32, 31) + 32
    codes = np.where(step != 0, again, codes).astype(np.uint8)
    q = _block_major(codes, n_blocks).reshape(n_blocks, 2, 4, 32)  # halves of 128, quarters of 32
    ql = np.concatenate([q[:, :, 0] & 0xF | ((q[:, :, 2] & 0xF) << 4),
                         q[:, :, 1] & 0xF | ((q[:, :, 3] & 0xF) << 4)], axis=2).reshape(n_blocks, 128)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4)
          | ((q[:, :, 3] >> 4) << 6)).reshape(n_blocks, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d.astype(np.float16).view(np.uint8).reshape(-1, 2)], axis=1)
    out[zero] = 0  # an all-zero block is written as zeros, d included
    return out


BLOCK_QUANTISERS = {"Q4_K": quantize_q4_k_blocks, "Q5_K": quantize_q5_k_blocks, "Q6_K": quantize_q6_k_blocks}


def quantize(array: np.ndarray, qtype: Any) -> np.ndarray:
    """``array (..., n)`` in ``qtype`` (a ``gguf.GGMLQuantizationType``), as ``gguf.quants.quantize`` shapes it.

    Returns uint8 ``(..., n / block_size * type_size)``. The K-quants are ported here; every other
    type is the ``gguf`` package's own. ``n`` must be a multiple of the type's block size
    (:func:`qlora_orpo.export.gguf_mix.tensor_type` picks a fallback type when it is not).
    """
    import gguf

    quantiser = BLOCK_QUANTISERS.get(qtype.name)
    if quantiser is None:
        return gguf.quants.quantize(array, qtype)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if array.shape[-1] % block:
        raise ValueError(f"cannot quantise rows of {array.shape[-1]} to {qtype.name}: not a multiple of {block}")
    blocks = np.asarray(array, dtype=F32).reshape(-1, block)
    out = np.empty((blocks.shape[0], type_size), dtype=np.uint8)
    for start in range(0, blocks.shape[0], CHUNK_BLOCKS):
        out[start:start + CHUNK_BLOCKS] = quantiser(blocks[start:start + CHUNK_BLOCKS])
    return out.reshape(*array.shape[:-1], array.shape[-1] // block * type_size)

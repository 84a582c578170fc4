"""Fused disentangled attention in Triton: the "triton" attention backend (flash-attention style, GPU).

Why a kernel: the reference path materialises the (B, N, L, L) content scores, the c2p and p2c gathers, the
probabilities and their gradients in fp32; that is where DeBERTa's step time and memory go. This backend keeps
score tiles on chip, like flash attention, and never allocates anything of size L x L.

How the relative terms get into a tile. Both position terms depend on the distance ``t = i - j`` only through one
row ``D(t)`` of the relative tables (see ``relative_position.py``)::

    score[i, j] = scale * (q_i . k_j  +  q_i . pos_key[D(i-j)]  +  k_j . pos_query[D(i-j)])

A (BLOCK_M, BLOCK_N) tile spans the ``BLOCK_M + BLOCK_N - 1`` consecutive distances of a window. The kernel loads
the window's rows of ``pos_key`` and ``pos_query`` (by ``D(t)``, so log buckets need no special case), multiplies
them on tensor cores (``q_tile @ pos_key[window]^T``: (BLOCK_M, W); ``k_tile @ pos_query[window]^T``: (BLOCK_N, W))
and shears the products into the tile with ``tl.gather`` (column ``c = i - j + BLOCK_N - 1`` of the window). So the
forward pass moves what flash attention moves: no (B, N, L, 2k) table is written or read.

The backward pass needs the table gradients ``dC2P[i, r] = sum_j dS[i, j] [D(i-j) = r]`` (and ``dP2C[j, r]`` with i
and j swapped), from which ``dq += dC2P @ pos_key``, ``d pos_key = dC2P^T @ q`` (and the same for k, pos_query)
are plain batched matmuls. Because ``D`` is non-decreasing in ``t``, the entries of one table row are sums of dS
over *contiguous runs* of keys along a query row (of queries down a key column). The query-side kernel keeps a
segmented scan of dS along each row (``tl.associative_scan`` with segment starts at run boundaries, the open
run's sum carried from tile to tile) and stores each run's sum once, in the input dtype, where the run ends; the
key-side kernel does the same down each column. Table entries that no pair reaches get an explicit zero. One
write per table entry, no atomics, no fp32 run buffers, no finalize pass. ``bench/attention_bytes.py`` counts
the bytes this moves against the earlier design.

Launch configurations are pinned per (GPU architecture, dtype, head size) in :data:`PINNED_CONFIGS`, chosen from
the ahead-of-time compile analysis of ``pretrain/model/triton_aot.py`` (registers, spills, shared memory, MMA
kind; ``python bench/kernel_resources.py`` prints it), so a cold start compiles one variant per kernel.
``DEBERTA_ATTENTION_AUTOTUNE=1`` autotunes over :data:`TUNING_CANDIDATES` instead. ``DEBERTA_ATTENTION_DEBUG_FILL=1``
fills every buffer the kernels should write with NaN first, so a missed store cannot pass a parity test.

Everything here also runs in Triton's interpreter (``TRITON_INTERPRET=1``) on CPU tensors, which is how the CPU
test-suite checks the kernels against :func:`pretrain.model.attention.reference_attention`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
if INTERPRETING:  # Triton <= 3.6's interpreter fails under NumPy >= 2.4 without this (see the module)
    from pretrain.model import triton_interpreter

    triton_interpreter.apply()
    triton_interpreter.vectorise_scans()  # a slice at a time instead of an element at a time (same results)

# A distance's table row lives in the low 24 bits of its lookup code; bits 24 and 25 flag where a run of one row
# begins (its smallest distance) and ends (its largest). The kernels spell these numbers out (Triton constants).
_RUN_START_BIT = 24
_RUN_END_BIT = 25


# ---------------------------------------------------------------------------------------------- device side
@triton.jit
def _batch_and_head(N_HEADS):
    """The (batch x head) index of this program (int64 for large offsets), its batch and its head: the head is grid
    axis 1 and the batch axis 2 (see :func:`launch_grid`)."""
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    return b * N_HEADS + h, b, h


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """Matrix product with fp32 accumulation: fp32 inputs in full precision (not TF32), 16-bit on tensor cores."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _position_window(POS, pos_base, sp_r, LUT, t_first, L, offs_d, WINDOW: tl.constexpr):
    """(HEAD_DIM, WINDOW): the projected relative rows ``D(t)`` for ``t = t_first .. t_first + WINDOW - 1``.

    Distances outside the sequence (tile tails, the window's spare column) are clamped into the table; the scores
    they would feed belong to masked pairs.
    """
    t = t_first + tl.arange(0, WINDOW)
    t = tl.minimum(tl.maximum(t, 1 - L), L - 1)
    row = tl.load(LUT + t + L - 1) & ((1 << 24) - 1)
    return tl.load(POS + pos_base + row[None, :].to(tl.int64) * sp_r + offs_d[:, None])


@triton.jit
def _sheared_part(x, POS, pos_base, sp_r, LUT, t_first, L, offs_d, c, FIRST: tl.constexpr, AXIS: tl.constexpr,
                  PART: tl.constexpr, IEEE: tl.constexpr):
    """The relative term of a tile from window columns FIRST .. FIRST + PART - 1 (0 for the other pairs).

    AXIS=1 (c2p): ``x`` is the query block (BLOCK_M, d), the product (BLOCK_M, PART) is sheared along rows.
    AXIS=0 (p2c): ``x`` is the transposed key block (d, BLOCK_N), the product (PART, BLOCK_N) down columns.
    The window is done in two parts so that only half of it is live in registers at a time (the difference
    between spilling and not at 64 x 64 tiles). The product is rounded to the input dtype before the shear, as a
    stored table would be: half the registers and shared memory of the gather.
    """
    pos = _position_window(POS, pos_base, sp_r, LUT, t_first + FIRST, L, offs_d, PART)  # (d, PART)
    if AXIS == 1:
        product = _dot(x, pos.to(x.dtype), IEEE).to(x.dtype)
    else:
        product = _dot(tl.trans(pos).to(x.dtype), x, IEEE).to(x.dtype)
    index = c - FIRST
    here = (index >= 0) & (index < PART)
    gathered = tl.gather(product, tl.minimum(tl.maximum(index, 0), PART - 1), axis=AXIS)
    return tl.where(here, gathered.to(tl.float32), 0.0)


@triton.jit
def _score_tile(q, kt, i0, j0, offs_m, offs_n, L, POS_K, POS_Q, pos_base, sp_r, LUT, offs_d,
                q_real, k_real, scale,
                HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr):
    """Scaled scores of one (BLOCK_M, BLOCK_N) tile and which of its pairs are real.

    ``q`` (BLOCK_M, d) and ``kt`` (d, BLOCK_N) hold the tile's queries and keys. Columns beyond L get -inf.
    """
    col_in = offs_n < L
    s = _dot(q, kt, IEEE)
    # Window column of pair (i, j): c = (i - i0) - (j - j0) + BLOCK_N - 1, i.e. distance t_first + c.
    c = tl.arange(0, BLOCK_M)[:, None] - tl.arange(0, BLOCK_N)[None, :] + (BLOCK_N - 1)
    t_first = i0 - j0 - (BLOCK_N - 1)
    if HAS_C2P:  # q_i . pos_key[D(i - j)]
        s += _sheared_part(q, POS_K, pos_base, sp_r, LUT, t_first, L, offs_d, c, 0, 1, WINDOW // 2, IEEE)
        s += _sheared_part(q, POS_K, pos_base, sp_r, LUT, t_first, L, offs_d, c, WINDOW // 2, 1, WINDOW // 2, IEEE)
    if HAS_P2C:  # k_j . pos_query[D(i - j)]: the window is (rows of the window, BLOCK_N), sheared down the columns
        s += _sheared_part(kt, POS_Q, pos_base, sp_r, LUT, t_first, L, offs_d, c, 0, 0, WINDOW // 2, IEEE)
        s += _sheared_part(kt, POS_Q, pos_base, sp_r, LUT, t_first, L, offs_d, c, WINDOW // 2, 0, WINDOW // 2, IEEE)
    s = s * scale
    pair_real = q_real[:, None] & k_real[None, :]
    # As HF's masked_fill + softmax: a real query gives padded keys no weight; a padded query row is fully masked,
    # which makes its softmax uniform over all L keys (score 0 everywhere gives exactly that, with an exact LSE).
    s = tl.where(pair_real, s, tl.where(q_real[:, None], float("-inf"), 0.0))
    s = tl.where(col_in[None, :], s, float("-inf"))
    return s, pair_real


@triton.jit
def _dropout_keep(seed, bh, offs_m, offs_n, L, dropout_p):
    """The same Bernoulli(1 - p) mask in the forward and both backward kernels: Philox on the (b, h, i, j) index."""
    offsets = (bh * L + offs_m[:, None].to(tl.int64)) * L + offs_n[None, :]
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _dropout_mask_kernel(KEEP, seed, L, dropout_p, N_HEADS, BLOCK: tl.constexpr):
    """The kernels' keep-mask written out as int8 (B, N, L, L): what the self-check applies to the reference."""
    bh, b, h = _batch_and_head(N_HEADS)
    offs_m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK)
    for j0 in range(0, L, BLOCK):
        keep = _dropout_keep(seed, bh, offs_m, j0 + offs_n, L, dropout_p)
        inside = (offs_m[:, None] < L) & ((j0 + offs_n)[None, :] < L)
        tl.store(KEEP + (bh * L + offs_m[:, None]) * L + j0 + offs_n[None, :], keep.to(tl.int8), mask=inside)


@triton.jit
def _rows(X, b, h, offs, offs_d, L, s_b, s_h, s_m):
    """(len(offs), HEAD_DIM) rows of a (B, N, L, d) tensor addressed by strides; rows beyond L read as 0."""
    return tl.load(X + b * s_b + h * s_h + offs[:, None] * s_m + offs_d[None, :], mask=(offs < L)[:, None],
                   other=0.0)


@triton.jit
def _key_block(K, V, MASK, b, h, offs_n, offs_d, L, sk_b, sk_h, sk_m, sv_b, sv_h, sv_m):
    """A block of keys (as rows and transposed), values transposed, and which keys are real tokens."""
    k = _rows(K, b, h, offs_n, offs_d, L, sk_b, sk_h, sk_m)
    v_t = tl.trans(_rows(V, b, h, offs_n, offs_d, L, sv_b, sv_h, sv_m))
    k_real = tl.load(MASK + b * L + offs_n, mask=offs_n < L, other=0) != 0
    return k, tl.trans(k), v_t, k_real


@triton.jit(do_not_specialize=["seed"])  # a fresh seed per call must not select another variant
def _forward_kernel(
    Q, K, V, POS_K, POS_Q, LUT, MASK, O, LSE,
    seed, scale, dropout_p,
    sq_b, sq_h, sq_m, sk_b, sk_h, sk_m, sv_b, sv_h, sv_m, so_b, so_h, so_m, sp_h, sp_r,
    N_HEADS, L,
    HEAD_DIM: tl.constexpr, HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr,
):
    bh, b, h = _batch_and_head(N_HEADS)
    i0 = tl.program_id(0) * BLOCK_M
    offs_m = i0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_in = offs_m < L
    q = _rows(Q, b, h, offs_m, offs_d, L, sq_b, sq_h, sq_m)
    q_real = tl.load(MASK + b * L + offs_m, mask=row_in, other=0) != 0

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for j0 in range(0, L, BLOCK_N):
        offs_n = j0 + tl.arange(0, BLOCK_N)
        k, kt, v_t, k_real = _key_block(K, V, MASK, b, h, offs_n, offs_d, L, sk_b, sk_h, sk_m, sv_b, sv_h, sv_m)
        s, pair_real = _score_tile(q, kt, i0, j0, offs_m, offs_n, L, POS_K, POS_Q, h * sp_h, sp_r,
                                   LUT, offs_d, q_real, k_real, scale, HAS_C2P, HAS_P2C, IEEE,
                                   BLOCK_M, BLOCK_N, WINDOW)
        # Rows beyond L have every score at -inf; keep their running max finite (they are never stored).
        m_new = tl.maximum(tl.maximum(m_i, tl.max(s, 1)), -3.0e38)
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m, offs_n, L, dropout_p)
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v_t.dtype), tl.trans(v_t), IEEE)
        m_i = m_new
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    acc = acc / l_safe[:, None]
    tl.store(O + b * so_b + h * so_h + offs_m[:, None] * so_m + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=row_in[:, None])
    tl.store(LSE + bh * L + offs_m, m_i + tl.log(l_safe), mask=row_in)


@triton.jit
def _score_gradient(q, kt, v_t, do, lse, delta, i0, j0, offs_m, offs_n, L, POS_K, POS_Q, pos_base,
                    sp_r, LUT, offs_d, q_real, k_real, scale, seed, bh, dropout_p,
                    HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr):
    """Recompute a tile's probabilities; return (P after dropout, dS = d loss / d unscaled score)."""
    s, pair_real = _score_tile(q, kt, i0, j0, offs_m, offs_n, L, POS_K, POS_Q, pos_base, sp_r, LUT,
                               offs_d, q_real, k_real, scale, HAS_C2P, HAS_P2C, IEEE, BLOCK_M, BLOCK_N, WINDOW)
    p = tl.exp(s - lse[:, None])  # rows beyond L load lse = +inf, so their p is 0
    dp = _dot(do, v_t, IEEE)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, bh, offs_m, offs_n, L, dropout_p)
        p_kept = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    else:
        p_kept = p
    # A masked pair's score is a constant (as masked_fill in the reference): no gradient flows through it.
    ds = tl.where(pair_real, p * (dp - delta[:, None]), 0.0) * scale
    return p_kept, ds


@triton.jit
def _query_block(Q, DO, LSE, DELTA, MASK, b, h, bh, offs_m, offs_d, L, sq_b, sq_h, sq_m, sdo_b, sdo_h, sdo_m):
    """What the backward pass needs of a block of query rows; rows beyond L load lse = +inf (probability 0)."""
    row_in = offs_m < L
    q = _rows(Q, b, h, offs_m, offs_d, L, sq_b, sq_h, sq_m)
    do = _rows(DO, b, h, offs_m, offs_d, L, sdo_b, sdo_h, sdo_m)
    lse = tl.load(LSE + bh * L + offs_m, mask=row_in, other=float("inf"))
    delta = tl.load(DELTA + bh * L + offs_m, mask=row_in, other=0.0)
    q_real = tl.load(MASK + b * L + offs_m, mask=row_in, other=0) != 0
    return q, do, lse, delta, q_real


@triton.jit
def _delta_kernel(O, DO, DELTA, so_b, so_h, so_m, sdo_b, sdo_h, sdo_m, N_HEADS, L,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Flash attention's ``delta = rowsum(dO * O)`` per query row, in fp32, from one read of O and dO."""
    bh, b, h = _batch_and_head(N_HEADS)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    o = _rows(O, b, h, offs_m, offs_d, L, so_b, so_h, so_m).to(tl.float32)
    do = _rows(DO, b, h, offs_m, offs_d, L, sdo_b, sdo_h, sdo_m).to(tl.float32)
    tl.store(DELTA + bh * L + offs_m, tl.sum(o * do, 1), mask=offs_m < L)


@triton.jit
def _segment_sum(a, a_started, b, b_started):
    """Combine of a segmented prefix sum: a segment start in the right operand discards what came before it."""
    return tl.where(b_started != 0, b, a + b), a_started | b_started


@triton.jit
def _run_sums(ds, code, carry, last, AXIS: tl.constexpr, START_BIT: tl.constexpr, END_BIT: tl.constexpr):
    """Sums of dS over runs of one table row along AXIS, for the runs that end in this tile.

    ``carry`` is the open run's sum from the previous tiles (per row for AXIS=1, per column for AXIS=0); ``last``
    marks the sequence's last position, where every run ends. Returns (sums, where a run ends, the new carry).
    """
    started = ((code >> START_BIT) & 1).to(tl.int32)
    ends = (((code >> END_BIT) & 1) != 0) | last
    run, begun = tl.associative_scan((ds, started), AXIS, _segment_sum)
    if AXIS == 1:
        run += tl.where(begun != 0, 0.0, carry[:, None])
        edge = (tl.arange(0, ds.shape[1]) == ds.shape[1] - 1)[None, :]
    else:
        run += tl.where(begun != 0, 0.0, carry[None, :])
        edge = (tl.arange(0, ds.shape[0]) == ds.shape[0] - 1)[:, None]
    carry = tl.sum(tl.where(edge & ~ends, run, 0.0), AXIS)  # the run still open at the tile's edge
    return run, ends, carry


@triton.jit
def _zero_unreached(OUT, base, offs, L, s_m, LUT, REACHED, TWO_K, lo_index, hi_index, valid,
                    BLOCK_R: tl.constexpr):
    """Store 0 in the table entries a row (column) of the attention never reaches.

    The distances of row ``offs`` lie between the LUT entries ``lo_index`` and ``hi_index``; its table rows are
    ``D`` of those, i.e. the attained rows (``REACHED``) between the two ends.
    """
    lo = tl.load(LUT + lo_index, mask=valid, other=0) & ((1 << 24) - 1)
    hi = tl.load(LUT + hi_index, mask=valid, other=0) & ((1 << 24) - 1)
    for r0 in range(0, TWO_K, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_in = r < TWO_K
        reached = tl.load(REACHED + r, mask=r_in, other=0) != 0
        used = reached[None, :] & (r[None, :] >= lo[:, None]) & (r[None, :] <= hi[:, None])
        zero = tl.zeros([offs.shape[0], BLOCK_R], tl.float32).to(OUT.dtype.element_ty)
        tl.store(OUT + base + offs[:, None] * s_m + r[None, :], zero, mask=valid[:, None] & r_in[None, :] & ~used)


@triton.jit(do_not_specialize=["seed"])  # a fresh seed per call must not select another variant
def _backward_query_kernel(
    Q, K, V, POS_K, POS_Q, LUT, REACHED, MASK, DO, LSE, DELTA, DQ, DC2P,
    seed, scale, dropout_p,
    sq_b, sq_h, sq_m, sk_b, sk_h, sk_m, sv_b, sv_h, sv_m, sdo_b, sdo_h, sdo_m, sp_h, sp_r,
    sg_b, sg_h, sg_m, st_b, st_h, st_m,
    N_HEADS, L, TWO_K,
    HEAD_DIM: tl.constexpr, HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr,
):
    """One block of query rows: dQ of the content term and, along each row, the c2p table gradient dC2P."""
    bh, b, h = _batch_and_head(N_HEADS)
    i0 = tl.program_id(0) * BLOCK_M
    offs_m = i0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_in = offs_m < L
    q, do, lse, delta, q_real = _query_block(Q, DO, LSE, DELTA, MASK, b, h, bh, offs_m, offs_d, L,
                                             sq_b, sq_h, sq_m, sdo_b, sdo_h, sdo_m)
    table = b * st_b + h * st_h

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    carry = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(0, L, BLOCK_N):  # increasing j = decreasing distance: a run begins at its largest distance
        offs_n = j0 + tl.arange(0, BLOCK_N)
        k, kt, v_t, k_real = _key_block(K, V, MASK, b, h, offs_n, offs_d, L, sk_b, sk_h, sk_m, sv_b, sv_h, sv_m)
        p, ds = _score_gradient(q, kt, v_t, do, lse, delta, i0, j0, offs_m, offs_n, L, POS_K, POS_Q, h * sp_h,
                                sp_r, LUT, offs_d, q_real, k_real, scale, seed, bh, dropout_p,
                                HAS_C2P, HAS_P2C, HAS_DROPOUT, IEEE, BLOCK_M, BLOCK_N, WINDOW)
        dq += _dot(ds.to(k.dtype), k, IEEE)
        if HAS_C2P:
            inside = row_in[:, None] & (offs_n < L)[None, :]
            code = tl.load(LUT + (offs_m[:, None] - offs_n[None, :] + L - 1), mask=inside, other=0)
            run, ends, carry = _run_sums(ds, code, carry, (offs_n == L - 1)[None, :], 1, 25, 24)
            tl.store(DC2P + table + offs_m[:, None] * st_m + (code & ((1 << 24) - 1)),
                     run.to(DC2P.dtype.element_ty), mask=inside & ends)
    tl.store(DQ + b * sg_b + h * sg_h + offs_m[:, None] * sg_m + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_in[:, None])
    if HAS_C2P:  # row i sees distances i - (L - 1) .. i, at LUT entries i .. i + L - 1
        _zero_unreached(DC2P, table, offs_m, L, st_m, LUT, REACHED, TWO_K, offs_m, offs_m + L - 1, row_in,
                        BLOCK_N)


@triton.jit(do_not_specialize=["seed"])  # a fresh seed per call must not select another variant
def _backward_key_kernel(
    Q, K, V, POS_K, POS_Q, LUT, REACHED, MASK, DO, LSE, DELTA, DK, DV, DP2C,
    seed, scale, dropout_p,
    sq_b, sq_h, sq_m, sk_b, sk_h, sk_m, sv_b, sv_h, sv_m, sdo_b, sdo_h, sdo_m, sp_h, sp_r,
    sg_b, sg_h, sg_m, st_b, st_h, st_m,
    N_HEADS, L, TWO_K,
    HEAD_DIM: tl.constexpr, HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr,
):
    """One block of key columns: dK and dV of the content term and, down each column, the p2c table gradient."""
    bh, b, h = _batch_and_head(N_HEADS)
    j0 = tl.program_id(0) * BLOCK_N
    offs_n = j0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_in = offs_n < L
    k, kt, v_t, k_real = _key_block(K, V, MASK, b, h, offs_n, offs_d, L, sk_b, sk_h, sk_m, sv_b, sv_h, sv_m)
    table = b * st_b + h * st_h

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    carry = tl.zeros([BLOCK_N], tl.float32)
    for i0 in range(0, L, BLOCK_M):  # increasing i = increasing distance: a run begins at its smallest distance
        offs_m = i0 + tl.arange(0, BLOCK_M)
        q, do, lse, delta, q_real = _query_block(Q, DO, LSE, DELTA, MASK, b, h, bh, offs_m, offs_d, L,
                                                 sq_b, sq_h, sq_m, sdo_b, sdo_h, sdo_m)
        p, ds = _score_gradient(q, kt, v_t, do, lse, delta, i0, j0, offs_m, offs_n, L, POS_K, POS_Q, h * sp_h,
                                sp_r, LUT, offs_d, q_real, k_real, scale, seed, bh, dropout_p,
                                HAS_C2P, HAS_P2C, HAS_DROPOUT, IEEE, BLOCK_M, BLOCK_N, WINDOW)
        dv += _dot(tl.trans(p).to(do.dtype), do, IEEE)
        dk += _dot(tl.trans(ds).to(q.dtype), q, IEEE)
        if HAS_P2C:
            inside = (offs_m < L)[:, None] & col_in[None, :]
            code = tl.load(LUT + (offs_m[:, None] - offs_n[None, :] + L - 1), mask=inside, other=0)
            run, ends, carry = _run_sums(ds, code, carry, (offs_m == L - 1)[:, None], 0, 24, 25)
            tl.store(DP2C + table + offs_n[None, :] * st_m + (code & ((1 << 24) - 1)),
                     run.to(DP2C.dtype.element_ty), mask=inside & ends)
    out = offs_n[:, None] * sg_m + offs_d[None, :]
    tl.store(DK + b * sg_b + h * sg_h + out, dk.to(DK.dtype.element_ty), mask=col_in[:, None])
    tl.store(DV + b * sg_b + h * sg_h + out, dv.to(DV.dtype.element_ty), mask=col_in[:, None])
    if HAS_P2C:  # column j sees distances -j .. L - 1 - j, at LUT entries L - 1 - j .. 2L - 2 - j
        _zero_unreached(DP2C, table, offs_n, L, st_m, LUT, REACHED, TWO_K, L - 1 - offs_n, 2 * L - 2 - offs_n,
                        col_in, BLOCK_M)


# ---------------------------------------------------------------------------------------------- launch settings
@dataclass(frozen=True)
class LaunchConfig:
    """One compiled variant's tiling: BLOCK_M query rows x BLOCK_N key columns, warps and pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    @property
    def window(self) -> int:
        """Columns of the relative window: BLOCK_M + BLOCK_N - 1 distances, rounded up to a power of two."""
        return triton.next_power_of_2(self.block_m + self.block_n)

    def meta(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, WINDOW=self.window)


KERNELS = ("forward", "backward_query", "backward_key")
# Where no pinned entry exists (another GPU generation, another head size): small tiles.
_DEFAULT_CONFIGS = {"forward": LaunchConfig(32, 32, 4, 2), "backward_query": LaunchConfig(32, 32, 4, 2),
                    "backward_key": LaunchConfig(16, 32, 4, 1)}
# "<compute capability>/<kernel>/<dtype>/<head size>" -> [BLOCK_M, BLOCK_N, warps, stages], chosen by
# `python bench/kernel_resources.py --clean-candidates ... / --pin ...` from registers, spills and shared memory of
# every candidate compiled ahead of time (pretrain/model/triton_aot.py) under the Triton releases named in the file.
PINNED_CONFIGS_FILE = Path(__file__).with_name("pinned_configs.json")
PINNED_CONFIGS: dict[str, list[int]] = (json.loads(PINNED_CONFIGS_FILE.read_text())["configs"]
                                        if PINNED_CONFIGS_FILE.exists() else {})
# Autotuning candidates (DEBERTA_ATTENTION_AUTOTUNE=1): the tiles that compile clean for some kernel on sm_80/sm_90
# (bench/analysis/), plus 64 x 64 whose spills only a measurement can price.
TUNING_CANDIDATES = [LaunchConfig(64, 64, 8, 2), LaunchConfig(64, 32, 8, 2), LaunchConfig(32, 32, 8, 2),
                     LaunchConfig(32, 32, 4, 2), LaunchConfig(16, 32, 4, 1)]
_INTERPRETER_CONFIG = LaunchConfig(16, 16, 1, 1)  # small tiles exercise multi-block loops on tiny inputs


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def pinned_config(kernel: str, capability_major: int, dtype: str, head_dim: int) -> LaunchConfig:
    """The configuration a launch uses when autotuning is off (``dtype``: bf16 | fp16 | fp32)."""
    pinned = PINNED_CONFIGS.get(f"{capability_major * 10}/{kernel}/{dtype}/{head_dim}")
    return LaunchConfig(*pinned) if pinned else _DEFAULT_CONFIGS[kernel]


def autotuning() -> bool:
    """``DEBERTA_ATTENTION_AUTOTUNE=1``: benchmark every candidate per shape (slow cold start, one compile each)."""
    return os.environ.get("DEBERTA_ATTENTION_AUTOTUNE", "0") == "1" and not INTERPRETING


def debug_fill() -> bool:
    """``DEBERTA_ATTENTION_DEBUG_FILL=1``: outputs start as NaN, so an entry a kernel fails to write shows."""
    return os.environ.get("DEBERTA_ATTENTION_DEBUG_FILL", "0") == "1"


_RAW_KERNELS = {"forward": _forward_kernel, "backward_query": _backward_query_kernel,
                "backward_key": _backward_key_kernel, "delta": _delta_kernel}
_DELTA_CONFIG = LaunchConfig(64, 64, 4, 1)  # one pass over O and dO; nothing to tune
_AUTOTUNE_KEY = ["L", "HEAD_DIM", "HAS_C2P", "HAS_P2C", "HAS_DROPOUT", "IEEE"]
_TUNED_KERNELS = {
    name: triton.autotune(
        configs=[triton.Config(c.meta(), num_warps=c.num_warps, num_stages=c.num_stages) for c in TUNING_CANDIDATES],
        key=_AUTOTUNE_KEY)(kernel)
    for name, kernel in _RAW_KERNELS.items() if name in KERNELS
}


MAX_GRID_YZ = 65535  # CUDA's limit on grid axes 1 and 2 (axis 0 takes 2^31 - 1)


def launch_grid(L: int, block: int, batch: int, heads: int) -> tuple[int, int, int]:
    """(tiles of L, heads, batch): tiles on axis 0, so the tiles of one head run side by side and share its K/V and
    relative window in L2; heads and batch on axes 1 and 2, each within CUDA's 65,535 (batch x heads on one axis
    would stop at ~5,400 sequences of 12 heads)."""
    if batch > MAX_GRID_YZ or heads > MAX_GRID_YZ:
        raise ValueError(f"fused attention launches at most {MAX_GRID_YZ} sequences and heads per call "
                         f"(got batch {batch}, heads {heads}): split the batch")
    return triton.cdiv(L, block), heads, batch


def _launch(name: str, tiled_axis: str, L: int, batch: int, heads: int, dtype: torch.dtype, *args,
            **constexprs) -> None:
    """Launch kernel ``name`` on the :func:`launch_grid` of ``tiled_axis`` (the block size along L): the pinned
    configuration for this GPU, dtype and head size, or autotuned on request."""
    if autotuning() and name in KERNELS:
        grid = lambda meta: launch_grid(L, meta[tiled_axis], batch, heads)  # noqa: E731
        _TUNED_KERNELS[name][grid](*args, **constexprs)
        return
    if INTERPRETING:
        config = _INTERPRETER_CONFIG
    elif name == "delta":
        config = _DELTA_CONFIG
    else:
        major = torch.cuda.get_device_capability()[0]
        config = pinned_config(name, major, dtype_name(dtype), constexprs["HEAD_DIM"])
    meta = config.meta() if name in KERNELS else dict(BLOCK_M=config.block_m)
    _RAW_KERNELS[name][launch_grid(L, meta[tiled_axis], batch, heads)](
        *args, **constexprs, **meta, num_warps=config.num_warps, num_stages=config.num_stages)


# ---------------------------------------------------------------------------------------------- host side
def relative_lookup(rel_index: Tensor, two_k: int) -> tuple[Tensor, Tensor]:
    """Kernel metadata from the (L, L) table-row index.

    Returns ``code`` (2L-1,) int32 indexed by ``i - j + L - 1``: the table row ``D`` of that distance plus a
    run-start flag (smallest distance of a run of one row) and a run-end flag (largest), and ``reached`` (2k,)
    uint8: 1 for the table rows some distance maps to. Pure tensor operations: no host synchronisation,
    traceable by ``torch.compile``.
    """
    table_row = torch.cat([rel_index[0].flip(0), rel_index[1:, 0]])  # D(t) for t = -(L-1) .. L-1
    # The run scheme needs D non-decreasing in t (true for linear and log buckets); checked without a sync.
    torch._assert_async(torch.all(table_row[1:] >= table_row[:-1]))
    changes = table_row[1:] != table_row[:-1]
    edge = torch.ones(1, dtype=torch.bool, device=rel_index.device)
    run_start = torch.cat([edge, changes])
    run_end = torch.cat([changes, edge])
    code = table_row | (run_start.long() << _RUN_START_BIT) | (run_end.long() << _RUN_END_BIT)
    reached = torch.zeros(two_k, dtype=torch.uint8, device=rel_index.device)
    reached[table_row.clamp(max=two_k - 1)] = 1  # (the clamp only matters without relative terms: unused)
    return code.to(torch.int32), reached


def _rows_contiguous(x: Tensor) -> Tensor:
    """The kernels address (B, N, L) by strides but read each head vector as consecutive elements."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _strides(x: Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _new(shape_in_memory: tuple[int, ...], order: tuple[int, ...], like: Tensor, dtype: torch.dtype) -> Tensor:
    """An output laid out as ``shape_in_memory`` and viewed in the order ``order``; NaN-filled in debug mode."""
    out = (torch.full(shape_in_memory, float("nan"), device=like.device, dtype=dtype) if debug_fill()
           else torch.empty(shape_in_memory, device=like.device, dtype=dtype))
    return out.permute(order)


def _gradient_buffer(q: Tensor) -> Tensor:
    """(B, N, L, d) view of (B, L, N, d) memory: the layout the projections' backward wants (no copy there)."""
    B, N, L, d = q.shape
    return _new((B, L, N, d), (0, 2, 1, 3), q, q.dtype)


def _table_buffer(q: Tensor, two_k: int) -> Tensor:
    """(B, N, L, 2k) view of (N, B, L, 2k) memory, so the per-head matmuls see (N, B*L, 2k) without a copy."""
    B, N, L, _ = q.shape
    return _new((N, B, L, two_k), (1, 0, 2, 3), q, q.dtype)


def _per_head(x: Tensor) -> Tensor:
    """(B, N, L, c) -> (N, B*L, c): a view for the layouts above and for projections' (B, L, N, d) outputs
    (a copy for other layouts; never used in place then)."""
    B, N, L, c = x.shape
    return x.transpose(0, 1).reshape(N, B * L, c)


def _per_head_view(x: Tensor) -> Tensor:
    """:func:`_per_head` of a buffer laid out by this module, as a view that can be updated in place."""
    B, N, L, c = x.shape
    return x.transpose(0, 1).view(N, B * L, c)


def _positions(pos: Optional[Tensor], like: Tensor) -> Tensor:
    """A projected relative table (N, 2k, d) as the kernels read it: contiguous, in the inputs' dtype."""
    return pos.to(like.dtype).contiguous() if pos is not None else like.new_empty(1)


@torch.library.custom_op("deberta_pretrain::disentangled_attention", mutates_args=())
def _attention_forward(q: Tensor, k: Tensor, v: Tensor, pos_key: Optional[Tensor], pos_query: Optional[Tensor],
                       code: Tensor, reached: Tensor, mask: Tensor, scale: float, dropout_p: float, seed: Tensor
                       ) -> tuple[Tensor, Tensor]:
    B, N, L, d = q.shape
    q, k, v = _rows_contiguous(q), _rows_contiguous(k), _rows_contiguous(v)
    pk, pq = _positions(pos_key, q), _positions(pos_query, q)
    out = _gradient_buffer(q)  # (B, N, L, d) view of (B, L, N, d): what the output projection reads
    lse = _new((B, N, L), (0, 1, 2), q, torch.float32)
    _launch("forward", "BLOCK_M", L, B, N, q.dtype,
            q, k, v, pk, pq, code, mask, out, lse, int(seed), scale, dropout_p,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out), reached.shape[0] * d, d, N, L,
            HEAD_DIM=d, HAS_C2P=pos_key is not None, HAS_P2C=pos_query is not None, HAS_DROPOUT=dropout_p > 0.0,
            IEEE=q.dtype == torch.float32)
    return out, lse


@_attention_forward.register_fake
def _(q, k, v, pos_key, pos_query, code, reached, mask, scale, dropout_p, seed):
    B, N, L, d = q.shape
    return q.new_empty(B, L, N, d).transpose(1, 2), q.new_empty(B, N, L, dtype=torch.float32)


@torch.library.custom_op("deberta_pretrain::disentangled_attention_backward", mutates_args=())
def _attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, pos_key: Optional[Tensor],
                        pos_query: Optional[Tensor], out: Tensor, lse: Tensor, code: Tensor, reached: Tensor,
                        mask: Tensor, scale: float, dropout_p: float, seed: Tensor
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, N, L, d = q.shape
    # grad_out may be an expanded tensor (stride 0), e.g. the gradient of out.sum()
    grad_out, q, k, v = (_rows_contiguous(t) for t in (grad_out, q, k, v))
    pk, pq = _positions(pos_key, q), _positions(pos_query, q)
    two_k = reached.shape[0]
    delta = _new((B, N, L), (0, 1, 2), q, torch.float32)
    _launch("delta", "BLOCK_M", L, B, N, q.dtype, out, grad_out, delta, *_strides(out), *_strides(grad_out), N, L,
            HEAD_DIM=d)
    dq, dk, dv = _gradient_buffer(q), _gradient_buffer(q), _gradient_buffer(q)
    d_c2p = _table_buffer(q, two_k) if pos_key is not None else q.new_empty(1, 1, 1, 1)
    d_p2c = _table_buffer(q, two_k) if pos_query is not None else q.new_empty(1, 1, 1, 1)
    common = dict(HEAD_DIM=d, HAS_C2P=pos_key is not None, HAS_P2C=pos_query is not None,
                  HAS_DROPOUT=dropout_p > 0.0, IEEE=q.dtype == torch.float32)
    inputs = (q, k, v, pk, pq, code, reached, mask, grad_out, lse, delta)
    scalars = (int(seed), scale, dropout_p, *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out),
               two_k * d, d)
    _launch("backward_query", "BLOCK_M", L, B, N, q.dtype, *inputs, dq, d_c2p, *scalars,
            *_strides(dq), *_strides(d_c2p), N, L, two_k, **common)
    _launch("backward_key", "BLOCK_N", L, B, N, q.dtype, *inputs, dk, dv, d_p2c, *scalars,
            *_strides(dk), *_strides(d_p2c), N, L, two_k, **common)

    # The relative terms' share of dq/dk and the gradients of the projected tables: batched matmuls per head over
    # the (N, B*L, .) views, accumulating into dq/dk in place (no temporaries of the table's size).
    d_pos_key, d_pos_query = q.new_empty(0), q.new_empty(0)
    if pos_key is not None:
        _per_head_view(dq).baddbmm_(_per_head_view(d_c2p), pk)
        d_pos_key = torch.bmm(_per_head_view(d_c2p).transpose(1, 2), _per_head(q)).to(pos_key.dtype)
    if pos_query is not None:
        _per_head_view(dk).baddbmm_(_per_head_view(d_p2c), pq)
        d_pos_query = torch.bmm(_per_head_view(d_p2c).transpose(1, 2), _per_head(k)).to(pos_query.dtype)
    return dq, dk, dv, d_pos_key, d_pos_query


@_attention_backward.register_fake
def _(grad_out, q, k, v, pos_key, pos_query, out, lse, code, reached, mask, scale, dropout_p, seed):
    B, N, L, d = q.shape
    return (*(q.new_empty(B, L, N, d).transpose(1, 2) for _ in range(3)),
            pos_key.new_empty(pos_key.shape) if pos_key is not None else q.new_empty(0),
            pos_query.new_empty(pos_query.shape) if pos_query is not None else q.new_empty(0))


def _setup_context(ctx, inputs, output):
    q, k, v, pos_key, pos_query, code, reached, mask, scale, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, pos_key, pos_query, out, lse, code, reached, mask, seed)
    ctx.scale, ctx.dropout_p = scale, dropout_p
    ctx.mark_non_differentiable(lse)  # the log-sum-exp is kept for the backward pass only


def _backward(ctx, grad_out, grad_lse):
    q, k, v, pos_key, pos_query, out, lse, code, reached, mask, seed = ctx.saved_tensors
    dq, dk, dv, d_pos_key, d_pos_query = _attention_backward(
        grad_out, q, k, v, pos_key, pos_query, out, lse, code, reached, mask, ctx.scale, ctx.dropout_p, seed)
    return (dq, dk, dv, d_pos_key if pos_key is not None else None, d_pos_query if pos_query is not None else None,
            None, None, None, None, None, None)


torch.library.register_autograd("deberta_pretrain::disentangled_attention", _backward, setup_context=_setup_context)


def _dropout_seed(dropout_p: float) -> Tensor:
    """The Philox seed of one call, drawn from torch's global generator on the host."""
    if dropout_p > 0:
        return torch.randint(0, 2**31 - 1, (), dtype=torch.int64)
    return torch.zeros((), dtype=torch.int64)


def dropout_keep_mask(batch: int, heads: int, length: int, dropout_p: float, device) -> Tensor:
    """(B, N, L, L) bool: the mask the next call of :func:`disentangled_attention` with ``dropout_p`` draws from the
    same state of torch's generator (re-seed it in between). For checks of the dropout variants."""
    seed = int(_dropout_seed(dropout_p))
    keep = torch.empty(batch, heads, length, length, dtype=torch.int8, device=device)
    block = 16
    _dropout_mask_kernel[launch_grid(length, block, batch, heads)](keep, seed, length, float(dropout_p), heads,
                                                                    BLOCK=block)
    return keep.bool()


def disentangled_attention(query, key, value, pos_key, pos_query, rel_index, key_padding_mask, scale, dropout_p):
    """The :class:`~pretrain.model.attention.AttentionCore` of the "triton" backend (self-attention, Lq == Lk).

    Dropout draws its Philox seed from torch's global generator on the host (no device synchronisation), so a
    seeded step gives the same mask on every run.
    """
    two_k = next((t.shape[1] for t in (pos_key, pos_query) if t is not None), 1)
    code, reached = relative_lookup(rel_index, two_k)
    seed = _dropout_seed(dropout_p)
    value = value.to(query.dtype)
    out, _ = torch.ops.deberta_pretrain.disentangled_attention(
        query, key.to(query.dtype), value, pos_key, pos_query, code, reached,
        key_padding_mask.to(torch.uint8).contiguous(), float(scale), float(dropout_p), seed)
    return out

"""Fused disentangled attention in Triton: the "triton" attention backend (flash-attention style, GPU).

Why a kernel: the reference path materialises the (B, N, L, L) content scores, the c2p and p2c gathers, the
probabilities and their gradients in fp32; that is where DeBERTa's step time and memory go. This backend keeps
score tiles on chip, like flash attention, and never allocates anything of size L x L.

How the relative terms get into a tile. Both position terms depend on the distance only through one table row
``D(t)``, ``t = i - j`` (see ``relative_position.py``)::

    score[i, j] = scale * (q_i.k_j + C2P[i, D(i-j)] + P2C[j, D(i-j)])
    C2P = q @ pos_key^T   (B, N, L, 2k)   content-to-position
    P2C = k @ pos_query^T (B, N, L, 2k)   position-to-content

The two tables are ordinary matmuls (memory linear in L); the kernel adds the gathered entries to each tile of
``q @ k^T``, with an online softmax, padding masks as HF's (a pair counts when both tokens are real), and
attention-probability dropout regenerated from a Philox seed in the backward pass.

The backward pass needs ``dC2P[i, r] = sum_j dS[i, j] [D(i-j) = r]`` (and ``dP2C`` with i and j swapped), a
scatter-add that would need atomics. Because ``D`` is non-decreasing in ``t``, every table row ``r`` covers a
contiguous run of distances, so the sum over a run is a difference of two prefix sums of ``dS`` along the row.
The kernel keeps a running prefix sum per row (per column for P2C) and stores it only where a run starts (ends):
one plain store per (row, r), no atomics, no L x L buffer. :func:`_finalize_kernel` turns those prefix sums into
the table gradients, which flow into q, k and the relative projections through two matmuls each.

Everything here is also runnable by Triton's interpreter (``TRITON_INTERPRET=1``) on CPU tensors, which is how the
CPU test-suite checks the kernel against :func:`pretrain.model.attention.reference_attention`.
"""

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Table row of a distance lives in the low bits of the lookup code; two flags mark the runs (see module docstring).
_REL_BITS = 24
_RUN_START_BIT = 24
_RUN_END_BIT = 25


def _configs(candidates: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    if INTERPRETING:  # the interpreter runs every config; one small tile exercises multi-block loops on tiny inputs
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in candidates]


_AUTOTUNE_KEY = ["L", "HEAD_DIM", "HAS_C2P", "HAS_P2C", "HAS_DROPOUT"]
_FWD_CONFIGS = _configs([(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 64, 4, 2), (128, 32, 4, 3)])
_BWD_CONFIGS = _configs([(64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 3)])


@triton.jit
def _batch_and_head(N_HEADS):
    """The (batch x head) index of this program (grid axis 1, int64 for large offsets), its batch and its head."""
    bh = tl.program_id(1).to(tl.int64)
    return bh, bh // N_HEADS, bh % N_HEADS


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """Matrix product with fp32 accumulation: fp32 inputs in full precision (not TF32), 16-bit on tensor cores."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _score_tile(q, kt, offs_m, offs_n, L, TWO_K, C2P, P2C, table_base, LUT, q_real, k_real, scale,
                HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, IEEE: tl.constexpr):
    """Scaled scores of one (BLOCK_M, BLOCK_N) tile, the tile's lookup codes, and which pairs are real.

    Columns beyond L get -inf (no probability mass).
    """
    col_in = offs_n < L
    inside = (offs_m < L)[:, None] & col_in[None, :]
    s = _dot(q, kt, IEEE)
    code = tl.load(LUT + (offs_m[:, None] - offs_n[None, :] + L - 1), mask=inside, other=0)
    rel = code & ((1 << 24) - 1)
    if HAS_C2P:  # C2P[i, D(i - j)]: consecutive j read neighbouring entries of row i
        s += tl.load(C2P + table_base + offs_m[:, None] * TWO_K + rel, mask=inside, other=0.0).to(tl.float32)
    if HAS_P2C:  # P2C[j, D(i - j)]: gathered as a (j, i) tile so that consecutive i read neighbouring entries
        inside_t = col_in[:, None] & (offs_m < L)[None, :]
        rel_t = tl.load(LUT + (offs_m[None, :] - offs_n[:, None] + L - 1), mask=inside_t, other=0) & ((1 << 24) - 1)
        p2c = tl.load(P2C + table_base + offs_n[:, None] * TWO_K + rel_t, mask=inside_t, other=0.0)
        s += tl.trans(p2c).to(tl.float32)
    s = s * scale
    pair_real = q_real[:, None] & k_real[None, :]
    # As HF's masked_fill + softmax: a real query gives padded keys no weight; a padded query row is fully masked,
    # which makes its softmax uniform over all L keys (score 0 everywhere gives exactly that, with an exact LSE).
    s = tl.where(pair_real, s, tl.where(q_real[:, None], float("-inf"), 0.0))
    s = tl.where(col_in[None, :], s, float("-inf"))
    return s, code, pair_real, inside


@triton.jit
def _dropout_keep(seed, bh, offs_m, offs_n, L, dropout_p):
    """The same Bernoulli(1 - p) mask in the forward and both backward kernels: Philox on the (b, h, i, j) index."""
    offsets = (bh * L + offs_m[:, None].to(tl.int64)) * L + offs_n[None, :]
    return tl.rand(seed, offsets) >= dropout_p


@triton.autotune(configs=_FWD_CONFIGS, key=_AUTOTUNE_KEY)
@triton.jit(do_not_specialize=["seed"])  # a fresh seed every call must not select another compiled variant
def _forward_kernel(
    Q, K, V, C2P, P2C, LUT, MASK, O, LSE,
    seed, scale, dropout_p,
    sq_b, sq_h, sq_m, sk_b, sk_h, sk_m, sv_b, sv_h, sv_m, so_b, so_h, so_m,
    N_HEADS, L, TWO_K,
    HEAD_DIM: tl.constexpr, HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    bh, b, h = _batch_and_head(N_HEADS)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_in = offs_m < L
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :], mask=row_in[:, None], other=0.0)
    q_real = tl.load(MASK + b * L + offs_m, mask=row_in, other=0) != 0
    table_base = bh * L * TWO_K

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_in = offs_n < L
        kt = tl.load(K + b * sk_b + h * sk_h + offs_n[None, :] * sk_m + offs_d[:, None], mask=col_in[None, :],
                     other=0.0)
        k_real = tl.load(MASK + b * L + offs_n, mask=col_in, other=0) != 0
        s, code, pair_real, inside = _score_tile(q, kt, offs_m, offs_n, L, TWO_K, C2P, P2C, table_base, LUT,
                                                 q_real, k_real, scale, HAS_C2P, HAS_P2C, IEEE)
        # Rows beyond L have every score at -inf; keep their running max finite (they are never stored).
        m_new = tl.maximum(tl.maximum(m_i, tl.max(s, 1)), -3.0e38)
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m, offs_n, L, dropout_p)
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        v = tl.load(V + b * sv_b + h * sv_h + offs_n[:, None] * sv_m + offs_d[None, :], mask=col_in[:, None],
                    other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    acc = acc / l_safe[:, None]
    tl.store(O + b * so_b + h * so_h + offs_m[:, None] * so_m + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=row_in[:, None])
    tl.store(LSE + bh * L + offs_m, m_i + tl.log(l_safe), mask=row_in)


@triton.jit
def _score_gradient(q, kt, v_t, do, lse, delta, offs_m, offs_n, L, TWO_K, C2P, P2C, table_base, LUT, q_real,
                    k_real, scale, seed, bh, dropout_p,
                    HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                    IEEE: tl.constexpr):
    """Recompute a tile's probabilities and return (P after dropout, dS = d loss / d raw score, lookup codes)."""
    s, code, pair_real, inside = _score_tile(q, kt, offs_m, offs_n, L, TWO_K, C2P, P2C, table_base, LUT,
                                             q_real, k_real, scale, HAS_C2P, HAS_P2C, IEEE)
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
    return p_kept, ds, code, inside


@triton.jit
def _query_block(Q, DO, LSE, DELTA, MASK, b, h, bh, offs_m, offs_d, L,
                 sq_b, sq_h, sq_m, sdo_b, sdo_h, sdo_m):
    """What the backward pass needs of a block of query rows; rows beyond L load lse = +inf (probability 0)."""
    row_in = offs_m < L
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :], mask=row_in[:, None], other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_m + offs_d[None, :], mask=row_in[:, None],
                 other=0.0)
    lse = tl.load(LSE + bh * L + offs_m, mask=row_in, other=float("inf"))
    delta = tl.load(DELTA + bh * L + offs_m, mask=row_in, other=0.0)
    q_real = tl.load(MASK + b * L + offs_m, mask=row_in, other=0) != 0
    return q, do, lse, delta, q_real


@triton.jit
def _key_block(K, V, MASK, b, h, offs_n, offs_d, L, sk_b, sk_h, sk_m, sv_b, sv_h, sv_m):
    """A block of keys and values, both transposed to (HEAD_DIM, BLOCK_N), and which keys are real tokens."""
    col_in = offs_n < L
    kt = tl.load(K + b * sk_b + h * sk_h + offs_n[None, :] * sk_m + offs_d[:, None], mask=col_in[None, :], other=0.0)
    v_t = tl.load(V + b * sv_b + h * sv_h + offs_n[None, :] * sv_m + offs_d[:, None], mask=col_in[None, :],
                  other=0.0)
    k_real = tl.load(MASK + b * L + offs_n, mask=col_in, other=0) != 0
    return kt, v_t, k_real


@triton.autotune(configs=_BWD_CONFIGS, key=_AUTOTUNE_KEY)
@triton.jit(do_not_specialize=["seed"])
def _backward_query_kernel(
    Q, K, V, C2P, P2C, LUT, MASK, DO, LSE, DELTA, DQ, RUN_SUMS, ROW_TOTALS,
    seed, scale, dropout_p,
    sq_b, sq_h, sq_m, sk_b, sk_h, sk_m, sv_b, sv_h, sv_m, sdo_b, sdo_h, sdo_m,
    N_HEADS, L, TWO_K,
    HEAD_DIM: tl.constexpr, HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One block of query rows: dQ from the content term, and the c2p run prefix sums along each row."""
    bh, b, h = _batch_and_head(N_HEADS)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_in = offs_m < L
    q, do, lse, delta, q_real = _query_block(Q, DO, LSE, DELTA, MASK, b, h, bh, offs_m, offs_d, L,
                                             sq_b, sq_h, sq_m, sdo_b, sdo_h, sdo_m)
    table_base = bh * L * TWO_K

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    running = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, L, BLOCK_N):  # increasing j: `running` is the prefix sum of dS along the row
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt, v_t, k_real = _key_block(K, V, MASK, b, h, offs_n, offs_d, L, sk_b, sk_h, sk_m, sv_b, sv_h, sv_m)
        p, ds, code, inside = _score_gradient(q, kt, v_t, do, lse, delta, offs_m, offs_n, L, TWO_K, C2P, P2C,
                                              table_base, LUT, q_real, k_real, scale, seed, bh, dropout_p,
                                              HAS_C2P, HAS_P2C, HAS_DROPOUT, IEEE)
        dq += _dot(ds.to(kt.dtype), tl.trans(kt), IEEE)
        if HAS_C2P:
            prefix = tl.cumsum(ds, 1) + running[:, None]
            running += tl.sum(ds, 1)
            run_start = ((code >> 24) & 1) != 0
            rel = code & ((1 << 24) - 1)
            tl.store(RUN_SUMS + table_base + offs_m[:, None] * TWO_K + rel, prefix, mask=inside & run_start)
    tl.store(DQ + bh * L * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :], dq, mask=row_in[:, None])
    if HAS_C2P:
        tl.store(ROW_TOTALS + bh * L + offs_m, running, mask=row_in)


@triton.autotune(configs=_BWD_CONFIGS, key=_AUTOTUNE_KEY)
@triton.jit(do_not_specialize=["seed"])
def _backward_key_kernel(
    Q, K, V, C2P, P2C, LUT, MASK, DO, LSE, DELTA, DK, DV, RUN_SUMS, COL_TOTALS,
    seed, scale, dropout_p,
    sq_b, sq_h, sq_m, sk_b, sk_h, sk_m, sv_b, sv_h, sv_m, sdo_b, sdo_h, sdo_m,
    N_HEADS, L, TWO_K,
    HEAD_DIM: tl.constexpr, HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One block of key columns: dK and dV from the content term, and the p2c run prefix sums down each column."""
    bh, b, h = _batch_and_head(N_HEADS)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_in = offs_n < L
    kt, v_t, k_real = _key_block(K, V, MASK, b, h, offs_n, offs_d, L, sk_b, sk_h, sk_m, sv_b, sv_h, sv_m)
    table_base = bh * L * TWO_K

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    running = tl.zeros([BLOCK_N], tl.float32)
    for start_m in range(0, L, BLOCK_M):  # increasing i: `running` is the prefix sum of dS down the column
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q, do, lse, delta, q_real = _query_block(Q, DO, LSE, DELTA, MASK, b, h, bh, offs_m, offs_d, L,
                                                 sq_b, sq_h, sq_m, sdo_b, sdo_h, sdo_m)
        p, ds, code, inside = _score_gradient(q, kt, v_t, do, lse, delta, offs_m, offs_n, L, TWO_K, C2P, P2C,
                                              table_base, LUT, q_real, k_real, scale, seed, bh, dropout_p,
                                              HAS_C2P, HAS_P2C, HAS_DROPOUT, IEEE)
        dv += _dot(tl.trans(p).to(do.dtype), do, IEEE)
        dk += _dot(tl.trans(ds).to(q.dtype), q, IEEE)
        if HAS_P2C:
            prefix = tl.cumsum(ds, 0) + running[None, :]
            running += tl.sum(ds, 0)
            run_end = ((code >> 25) & 1) != 0
            rel = code & ((1 << 24) - 1)
            tl.store(RUN_SUMS + table_base + offs_n[None, :] * TWO_K + rel, prefix, mask=inside & run_end)
    out = bh * L * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out, dk, mask=col_in[:, None])
    tl.store(DV + out, dv, mask=col_in[:, None])
    if HAS_P2C:
        tl.store(COL_TOTALS + bh * L + offs_n, running, mask=col_in)


@triton.jit
def _run_sum_at(RUN_SUMS, SLOT, TPOS, row_base, total, rows, r, r_in, L, TWO_K, POS_SIGN: tl.constexpr):
    """Prefix sum of dS up to the boundary of table row r (see _finalize_kernel), for a (rows, r) tile."""
    slot = tl.load(SLOT + r, mask=r_in, other=-1)
    t = tl.load(TPOS + r, mask=r_in, other=0)
    pos = rows[:, None] + POS_SIGN * t[None, :]
    stored = (slot[None, :] >= 0) & (pos >= 0) & (pos < L) & (rows < L)[:, None]
    value = tl.load(RUN_SUMS + row_base + rows[:, None] * TWO_K + slot[None, :], mask=stored, other=0.0)
    everything = (slot[None, :] >= 0) & (pos >= L)
    return tl.where(everything, total[:, None], value)


@triton.jit
def _finalize_kernel(RUN_SUMS, TOTALS, SLOT, TPOS, OUT, L, TWO_K,
                     POS_SIGN: tl.constexpr, STEP: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr):
    """Table gradient from the stored run prefix sums: ``out[row, r] = S(r) - S(r + STEP)``.

    c2p (POS_SIGN=-1, STEP=+1): ``S(r) = sum_j dS[i, j] [D(i - j) >= r]``, the row prefix up to ``j = i - T_lo(r)``.
    p2c (POS_SIGN=+1, STEP=-1): ``S(r) = sum_i dS[i, j] [D(i - j) <= r]``, the column prefix up to ``i = j + T_hi(r)``.
    ``SLOT[r]`` is the attained table row whose run bounds r (-1: none, S = 0) and ``TPOS[r]`` that run's boundary
    distance; boundaries before the first token give 0 and after the last token the full row/column total.
    """
    bh = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    row_base = bh * L * TWO_K
    total = tl.load(TOTALS + bh * L + rows, mask=rows < L, other=0.0)
    for r0 in range(0, TWO_K, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_in = r < TWO_K
        here = _run_sum_at(RUN_SUMS, SLOT, TPOS, row_base, total, rows, r, r_in, L, TWO_K, POS_SIGN)
        nb = r + STEP
        nb_in = (nb >= 0) & (nb < TWO_K)
        there = _run_sum_at(RUN_SUMS, SLOT, TPOS, row_base, total, rows, nb, nb_in, L, TWO_K, POS_SIGN)
        there = tl.where(nb_in[None, :], there, 0.0)
        tl.store(OUT + row_base + rows[:, None] * TWO_K + r[None, :], (here - there).to(OUT.dtype.element_ty),
                 mask=(rows < L)[:, None] & r_in[None, :])


# ---------------------------------------------------------------------------------------------- host side
def relative_lookup(rel_index: Tensor, two_k: int) -> tuple[Tensor, Tensor]:
    """Kernel metadata from the (L, L) table-row index: per-distance codes and per-table-row run boundaries.

    Returns ``code`` (2L-1,) int32 indexed by ``i - j + L - 1``: table row ``D`` plus run-start/run-end flags, and
    ``runs`` (4, 2k) int32: for the c2p side the first attained row >= r and the first distance of its run
    (``T_lo``), for the p2c side the last attained row <= r and the last distance of its run (``T_hi``).
    Pure tensor operations: no host synchronisation, traceable by ``torch.compile``.
    """
    length = rel_index.shape[0]
    table_row = torch.cat([rel_index[0].flip(0), rel_index[1:, 0]])  # D(t) for t = -(L-1) .. L-1
    # The prefix-sum scheme needs D non-decreasing in t (true for linear and log buckets); checked without a sync.
    torch._assert_async(torch.all(table_row[1:] >= table_row[:-1]))
    changes = table_row[1:] != table_row[:-1]
    edge = torch.ones(1, dtype=torch.bool, device=rel_index.device)
    run_start = torch.cat([edge, changes])
    run_end = torch.cat([changes, edge])
    code = table_row | (run_start.long() << _RUN_START_BIT) | (run_end.long() << _RUN_END_BIT)
    r = torch.arange(two_k, device=rel_index.device, dtype=table_row.dtype)
    size = table_row.numel()
    lo = torch.searchsorted(table_row, r, right=False)  # first t with D(t) >= r
    lo_slot = torch.where(lo < size, table_row[lo.clamp(max=size - 1)], -1)
    hi = torch.searchsorted(table_row, r, right=True) - 1  # last t with D(t) <= r
    hi_slot = torch.where(hi >= 0, table_row[hi.clamp(min=0)], -1)
    runs = torch.stack([lo_slot, lo - (length - 1), hi_slot, hi - (length - 1)])
    return code.to(torch.int32), runs.to(torch.int32)


def _relative_tables(q: Tensor, k: Tensor, pos_key: Optional[Tensor], pos_query: Optional[Tensor]
                     ) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """C2P = q @ pos_key^T and P2C = k @ pos_query^T, (B, N, L, 2k) contiguous, in the inputs' dtype."""
    c2p = torch.matmul(q, pos_key.to(q.dtype).transpose(-1, -2)).contiguous() if pos_key is not None else None
    p2c = torch.matmul(k, pos_query.to(k.dtype).transpose(-1, -2)).contiguous() if pos_query is not None else None
    return c2p, p2c


def _strides(x: Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _rows_contiguous(x: Tensor) -> Tensor:
    """The kernels address (B, N, L) by strides but read each head vector as consecutive elements."""
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.library.custom_op("deberta_pretrain::disentangled_attention", mutates_args=())
def _attention_forward(q: Tensor, k: Tensor, v: Tensor, pos_key: Optional[Tensor], pos_query: Optional[Tensor],
                       code: Tensor, runs: Tensor, mask: Tensor, scale: float, dropout_p: float, seed: Tensor
                       ) -> tuple[Tensor, Tensor]:
    B, N, L, d = q.shape
    q, k, v = _rows_contiguous(q), _rows_contiguous(k), _rows_contiguous(v)
    c2p, p2c = _relative_tables(q, k, pos_key, pos_query)
    two_k = runs.shape[1]
    out = torch.empty(B, L, N, d, device=q.device, dtype=q.dtype).transpose(1, 2)  # (B, N, L, d) view
    lse = torch.empty(B, N, L, device=q.device, dtype=torch.float32)
    dummy = q.new_empty(1)

    def grid(meta):
        return triton.cdiv(L, meta["BLOCK_M"]), B * N

    _forward_kernel[grid](
        q, k, v, c2p if c2p is not None else dummy, p2c if p2c is not None else dummy, code, mask, out, lse,
        int(seed), scale, dropout_p,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), N, L, two_k,
        HEAD_DIM=d, HAS_C2P=c2p is not None, HAS_P2C=p2c is not None, HAS_DROPOUT=dropout_p > 0.0,
        IEEE=q.dtype == torch.float32,
    )
    return out, lse


@_attention_forward.register_fake
def _(q, k, v, pos_key, pos_query, code, runs, mask, scale, dropout_p, seed):
    B, N, L, d = q.shape
    out = q.new_empty(B, L, N, d).transpose(1, 2)
    return out, q.new_empty(B, N, L, dtype=torch.float32)


@torch.library.custom_op("deberta_pretrain::disentangled_attention_backward", mutates_args=())
def _attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, pos_key: Optional[Tensor],
                        pos_query: Optional[Tensor], out: Tensor, lse: Tensor, code: Tensor, runs: Tensor,
                        mask: Tensor, scale: float, dropout_p: float, seed: Tensor
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, N, L, d = q.shape
    # grad_out may be an expanded tensor (stride 0), e.g. the gradient of out.sum()
    grad_out, q, k, v = (_rows_contiguous(t) for t in (grad_out, q, k, v))
    c2p, p2c = _relative_tables(q, k, pos_key, pos_query)  # recomputed: cheaper than keeping them per layer
    two_k = runs.shape[1]
    delta = (grad_out.float() * out.float()).sum(-1)  # (B, N, L): rowsum(dO * O), as in flash attention
    dq = torch.empty(B, N, L, d, device=q.device, dtype=torch.float32)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    dummy = q.new_empty(1)
    c2p_sums = torch.empty(B, N, L, two_k, device=q.device, dtype=torch.float32) if c2p is not None else dummy
    p2c_sums = torch.empty(B, N, L, two_k, device=q.device, dtype=torch.float32) if p2c is not None else dummy
    row_totals = torch.empty(B, N, L, device=q.device, dtype=torch.float32)
    col_totals = torch.empty_like(row_totals)
    common = dict(HEAD_DIM=d, HAS_C2P=c2p is not None, HAS_P2C=p2c is not None, HAS_DROPOUT=dropout_p > 0.0,
                  IEEE=q.dtype == torch.float32)
    tensors = (q, k, v, c2p if c2p is not None else dummy, p2c if p2c is not None else dummy, code, mask, grad_out,
               lse, delta)
    scalars = (int(seed), scale, dropout_p, *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), N, L,
               two_k)
    _backward_query_kernel[lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), B * N)](
        *tensors, dq, c2p_sums, row_totals, *scalars, **common)
    _backward_key_kernel[lambda meta: (triton.cdiv(L, meta["BLOCK_N"]), B * N)](
        *tensors, dk, dv, p2c_sums, col_totals, *scalars, **common)

    d_pos_key, d_pos_query = q.new_empty(0), q.new_empty(0)
    blocks = dict(BLOCK_L=16 if INTERPRETING else 32, BLOCK_R=16 if INTERPRETING else 128)
    if c2p is not None:  # dC2P -> dq and d pos_key
        d_c2p = torch.empty(B, N, L, two_k, device=q.device, dtype=q.dtype)
        _finalize_kernel[(triton.cdiv(L, blocks["BLOCK_L"]), B * N)](
            c2p_sums, row_totals, runs[0], runs[1], d_c2p, L, two_k, POS_SIGN=-1, STEP=1, **blocks)
        dq += torch.matmul(d_c2p, pos_key.to(q.dtype)).float()
        d_pos_key = torch.einsum("bnlr,bnld->nrd", d_c2p, q).to(pos_key.dtype)
    if p2c is not None:  # dP2C -> dk and d pos_query
        d_p2c = torch.empty(B, N, L, two_k, device=q.device, dtype=q.dtype)
        _finalize_kernel[(triton.cdiv(L, blocks["BLOCK_L"]), B * N)](
            p2c_sums, col_totals, runs[2], runs[3], d_p2c, L, two_k, POS_SIGN=1, STEP=-1, **blocks)
        dk += torch.matmul(d_p2c, pos_query.to(k.dtype)).float()
        d_pos_query = torch.einsum("bnlr,bnld->nrd", d_p2c, k).to(pos_query.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), d_pos_key, d_pos_query


@_attention_backward.register_fake
def _(grad_out, q, k, v, pos_key, pos_query, out, lse, code, runs, mask, scale, dropout_p, seed):
    # Gradients come back contiguous (B, N, L, d), as the real implementation returns them.
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            pos_key.new_empty(pos_key.shape) if pos_key is not None else q.new_empty(0),
            pos_query.new_empty(pos_query.shape) if pos_query is not None else q.new_empty(0))


def _setup_context(ctx, inputs, output):
    q, k, v, pos_key, pos_query, code, runs, mask, scale, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, pos_key, pos_query, out, lse, code, runs, mask, seed)
    ctx.scale, ctx.dropout_p = scale, dropout_p
    ctx.mark_non_differentiable(lse)  # the log-sum-exp is kept for the backward pass only


def _backward(ctx, grad_out, grad_lse):
    q, k, v, pos_key, pos_query, out, lse, code, runs, mask, seed = ctx.saved_tensors
    dq, dk, dv, d_pos_key, d_pos_query = _attention_backward(
        grad_out, q, k, v, pos_key, pos_query, out, lse, code, runs, mask, ctx.scale, ctx.dropout_p, seed)
    return (dq, dk, dv, d_pos_key if pos_key is not None else None, d_pos_query if pos_query is not None else None,
            None, None, None, None, None, None)


torch.library.register_autograd("deberta_pretrain::disentangled_attention", _backward, setup_context=_setup_context)


def disentangled_attention(query, key, value, pos_key, pos_query, rel_index, key_padding_mask, scale, dropout_p):
    """The :class:`~pretrain.model.attention.AttentionCore` of the "triton" backend (self-attention, Lq == Lk).

    Dropout draws its Philox seed from torch's global generator on the host (no device synchronisation), so a
    seeded step gives the same mask on every run.
    """
    two_k = next((t.shape[1] for t in (pos_key, pos_query) if t is not None), 1)
    code, runs = relative_lookup(rel_index, two_k)
    seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64) if dropout_p > 0 else torch.zeros((), dtype=torch.int64)
    value = value.to(query.dtype)
    out, _ = torch.ops.deberta_pretrain.disentangled_attention(
        query, key.to(query.dtype), value, pos_key, pos_query, code, runs,
        key_padding_mask.to(torch.uint8).contiguous(), float(scale), float(dropout_p), seed)
    return out

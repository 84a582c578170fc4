"""Bytes moved by one fused-attention forward + backward at a given shape: the kernels' loads and stores plus every
PyTorch op the host code runs around them, counted from the code itself.

Why bytes: at DeBERTa shapes the attention's FLOPs take a fraction of the time its memory traffic does (v3-base,
B=32, 12 heads, L=512: ~0.2 TFLOP, i.e. ~0.3 ms of H100 tensor cores, against several ms of DRAM traffic for a
design that writes (B, N, L, 2k) tables). So the figure to keep small, and to guard in a test, is the bytes.

How it is counted (no GPU, no allocation of the real sizes):
- The host code of the custom ops (``_attention_forward``, ``_attention_backward``) runs on ``meta`` tensors under
  a ``TorchDispatchMode`` that adds, for every ATen op that moves data, the bytes of its tensor inputs and outputs
  (views, ``empty`` and metadata ops move nothing). An added temporary or copy shows up here.
- Kernel launches are recorded instead of run: every tensor argument a kernel reads counts once, every output it
  writes counts once. This is the usual flash-attention accounting: tiles of K/V re-read by the programs of one
  head come from L2, and the relative window rows (``(N, 2k, d)``, about 1.5 MB at v3-base) are read from L2.

That count is the DRAM floor: what must cross DRAM at least once. The kernels also re-load data inside: every
score tile loads its relative window (``WINDOW`` rows of ``pos_key`` and ``pos_query`` and their lookup codes),
every query block loads all K/V tiles of its head, every key block all Q/dO tiles. Whether those re-loads are L2
hits decides the real speed, so ``--requests`` adds, per kernel, the load requests of the pinned tiling (counted
from the kernels' loop structure, :func:`load_requests`) beside the floor, and the unique bytes they touch per head
(what L2 must hold for the re-loads to hit)::

    python bench/attention_bytes.py                       # v3-base shape, bf16: bytes per step and in total
    python bench/attention_bytes.py --batch 8 --length 2048
    python bench/attention_bytes.py --json out.json
    python bench/attention_bytes.py --requests            # the DRAM floor and the load requests per kernel (sm_90)
    python bench/attention_bytes.py --batch 4 --length 4096 --requests   # one layer of the GPU check's 4096 row

Beside the bytes it prints the layer's model FLOPs (:func:`model_flops`: the matmuls of the definition, as
``pretrain/run/perf.py`` counts them for MFU) and the arithmetic intensity, FLOPs per byte of the DRAM floor.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from pretrain.model import triton_attention as kernels  # noqa: E402
from pretrain.model.relative_position import relative_position_index  # noqa: E402

# v3-base attention: hidden 768 = 12 heads x 64, position_buckets 256 (2k = 512 table rows), max_position 512.
V3_BASE = dict(batch=32, heads=12, length=512, head_dim=64, buckets=256, max_position=512)
# What each kernel writes (every other tensor argument it reads).
WRITTEN_BY = {"forward": {"O", "LSE"}, "backward_query": {"DQ", "DC2P"}, "backward_key": {"DK", "DV", "DP2C"},
              "delta": {"DELTA"}}
# The design before the table-free rewrite (git 831ec8e), for the "before" figure: ``--design-at 831ec8e``.
_WRITTEN_EARLIER = {"_forward_kernel": {"O", "LSE"}, "_backward_query_kernel": {"DQ", "RUN_SUMS", "ROW_TOTALS"},
                    "_backward_key_kernel": {"DK", "DV", "RUN_SUMS", "COL_TOTALS"}, "_finalize_kernel": {"OUT"}}
# Ops that allocate or relabel memory without moving data (``_unsafe_view`` is matmul's internal reshape).
_NO_DATA = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
            "lift_fresh", "_unsafe_view", "_local_scalar_dense"}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _ByteCounter(TorchDispatchMode):
    """Bytes read and written by each data-moving ATen op, accumulated under the current step's name."""

    def __init__(self, totals: dict[str, int]):
        super().__init__()
        self.totals = totals
        self.step = "host"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if not func.is_view and name not in _NO_DATA:
            tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            results = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
            moved = sum(_nbytes(t) for t in tensors) + sum(_nbytes(t) for t in results)
            self.totals[f"{self.step}: aten.{name}"] += moved
        return out


def _record_launch(totals: dict[str, int]):
    """A stand-in for ``triton_attention._launch``: counts each kernel's tensor arguments instead of running it."""

    def launch(name, tiled_axis, L, batch, heads, dtype, *args, **constexprs):
        arg_names = kernels._RAW_KERNELS[name].arg_names
        _count_kernel_arguments(totals, name, arg_names, args, WRITTEN_BY[name])

    return launch


def _count_kernel_arguments(totals, name, arg_names, args, written) -> None:
    for arg_name, value in zip(arg_names, args):
        if isinstance(value, torch.Tensor) and value.numel() > 1:
            kind = "writes" if arg_name in written else "reads"
            totals[f"kernel {name} {kind}"] += _nbytes(value)


class _RecordingKernel:
    """Stands in for a ``kernel[grid](...)`` launch of the earlier design's module."""

    def __init__(self, name, arg_names, totals):
        self.name, self.arg_names, self.totals = name, arg_names, totals

    def __getitem__(self, grid):
        return lambda *args, **kwargs: _count_kernel_arguments(self.totals, self.name, self.arg_names, args,
                                                               _WRITTEN_EARLIER[self.name])


def earlier_design(revision: str):
    """The kernel module as it was at a git revision, loaded under another op namespace (no clash)."""
    import importlib.util
    import subprocess
    import tempfile

    source = subprocess.run(["git", "show", f"{revision}:pretrain/model/triton_attention.py"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "triton_attention_earlier.py"  # Triton reads a kernel's source from its file
    path.write_text(source.replace("deberta_pretrain::", "deberta_pretrain_earlier::"))
    spec = importlib.util.spec_from_file_location("triton_attention_earlier", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def count(batch: int, heads: int, length: int, head_dim: int, buckets: int, max_position: int,
          dtype: torch.dtype = torch.bfloat16, c2p: bool = True, p2c: bool = True, design=None) -> dict[str, int]:
    """Bytes per step of one attention forward + backward (as training runs it), keyed by what moved them.

    ``design``: the kernel module to count (default: this checkout's; see :func:`earlier_design`).
    """
    module = design or kernels
    span = buckets if buckets > 0 else max_position
    rel_index = relative_position_index(length, length, span, buckets, max_position)
    code, metadata = (t.to("meta") for t in module.relative_lookup(rel_index, 2 * span))

    def tensor(*shape):
        return torch.empty(*shape, device="meta", dtype=dtype)

    # q, k, v as the projections produce them: (B, N, L, d) views of (B, L, N*d)
    q, k, v, grad_out = (tensor(batch, length, heads, head_dim).transpose(1, 2) for _ in range(4))
    pos_key = tensor(2 * span, heads, head_dim).transpose(0, 1) if c2p else None
    pos_query = tensor(2 * span, heads, head_dim).transpose(0, 1) if p2c else None
    mask = torch.empty(batch, length, device="meta", dtype=torch.uint8)
    seed = torch.zeros((), dtype=torch.int64)

    totals: dict[str, int] = defaultdict(int)
    if design is None:
        replaced = {"_launch": _record_launch(totals)}
    else:  # the earlier module launched its (autotuned) kernels directly
        replaced = {name: _RecordingKernel(name, obj.arg_names, totals) for name, obj in vars(module).items()
                    if name.endswith("_kernel") and hasattr(obj, "arg_names")}
    saved = {name: getattr(module, name) for name in replaced}
    vars(module).update(replaced)
    try:
        with _ByteCounter(totals) as counter:
            counter.step = "forward"
            out, lse = module._attention_forward._init_fn(q, k, v, pos_key, pos_query, code, metadata, mask, 0.125,
                                                          0.1, seed)
            counter.step = "backward"
            module._attention_backward._init_fn(grad_out, q, k, v, pos_key, pos_query, out, lse, code, metadata,
                                                mask, 0.125, 0.1, seed)
    finally:
        vars(module).update(saved)
    return dict(totals)


def model_flops(batch: int, heads: int, length: int, head_dim: int, buckets: int, max_position: int,
                c2p: bool = True, p2c: bool = True) -> int:
    """Forward + backward matmul FLOPs of one attention core at this shape, by the convention of
    ``pretrain/run/perf.py`` (multiply-add = 2, backward = 2 x forward): QK^T and PV over all L x L pairs, c2p and
    p2c against all 2k table rows (the definition in ``reference_probabilities``); projections not included."""
    two_k = 2 * (buckets if buckets > 0 else max_position)
    per_head = 2 * 2 * length * length * head_dim + 2 * length * two_k * head_dim * (int(c2p) + int(p2c))
    return 3 * batch * heads * per_head


def load_requests(batch: int, heads: int, length: int, head_dim: int, buckets: int, max_position: int,
                  dtype: str = "bf16", arch: int = 90) -> dict[str, dict[str, int]]:
    """Bytes the loads of each kernel request from global memory (L2 hits included) at the pinned tiling for
    ``arch``, by what is loaded, from the kernels' loop structure (both position terms on, as every DeBERTa
    release). A window is ``WINDOW`` table rows of ``d`` elements and ``WINDOW`` int32 lookup codes, per term and
    score tile; the backward kernels also load one int32 code per pair of a tile for the run sums."""
    e = {"bf16": 2, "fp16": 2, "fp32": 4}[dtype]
    d, L, programs_bh = head_dim, length, batch * heads
    two_k = 2 * (buckets if buckets > 0 else max_position)
    result = {}
    for kernel in kernels.KERNELS:
        c = kernels.pinned_config(kernel, arch // 10, dtype, head_dim)
        bm, bn, w = c.block_m, c.block_n, c.window
        t_m, t_n = math.ceil(L / bm), math.ceil(L / bn)
        tiles = programs_bh * t_m * t_n  # score tiles computed by the kernel
        window = tiles * 2 * (w * d * e + w * 4)  # two terms: rows of the projected table and their codes
        if kernel == "forward":
            own = programs_bh * t_m * bm * (d * e + 1)  # Q and mask rows, once per program
            streamed = tiles * bn * (2 * d * e + 1)  # K, V and mask of every key tile
            codes = 0
        elif kernel == "backward_query":
            own = programs_bh * t_m * bm * (2 * d * e + 8 + 1)  # Q, dO, LSE, delta, mask
            streamed = tiles * bn * (2 * d * e + 1)  # K, V, mask per key tile
            codes = tiles * bm * bn * 4 + programs_bh * t_m * (2 * bm * 4 + math.ceil(two_k / bn) * bn)
        else:
            own = programs_bh * t_n * bn * (2 * d * e + 1)  # K, V, mask
            streamed = tiles * bm * (2 * d * e + 8 + 1)  # Q, dO, LSE, delta, mask per query tile
            codes = tiles * bm * bn * 4 + programs_bh * t_n * (2 * bn * 4 + math.ceil(two_k / bm) * bm)
        result[kernel] = {"tile": f"{bm}x{bn} w{w}", "programs": programs_bh * (t_n if kernel == "backward_key"
                                                                                 else t_m),
                          "own_block": own, "streamed_tiles": streamed, "relative_window": window,
                          "lookup_codes": codes, "total": own + streamed + window + codes,
                          "streamed_rereads": t_m if kernel != "backward_key" else t_n}
    return result


def requests_table(shape: dict[str, int], dtype: str, arch: int, totals: dict[str, int]) -> str:
    """Markdown: per kernel the DRAM floor (its arguments once) and the load requests, and what L2 must hold."""
    req = load_requests(**shape, dtype=dtype, arch=arch)
    e = {"bf16": 2, "fp16": 2, "fp32": 4}[dtype]
    lines = ["| kernel | tile (sm_%d) | DRAM floor, MB | load requests, MB | of which: relative window | "
             "K/V or Q/dO tiles (re-read x) | lookup codes |" % arch, "|---|---|---|---|---|---|---|"]
    for kernel, r in req.items():
        floor = totals.get(f"kernel {kernel} reads", 0) + totals.get(f"kernel {kernel} writes", 0)
        lines.append(f"| {kernel} | {r['tile']} | {floor / 1e6:,.0f} | {r['total'] / 1e6:,.0f} | "
                     f"{r['relative_window'] / 1e6:,.0f} | {r['streamed_tiles'] / 1e6:,.0f} "
                     f"({r['streamed_rereads']}x) | {r['lookup_codes'] / 1e6:,.0f} |")
    floor = sum(totals.values())
    requested = sum(r["total"] for r in req.values())
    span = shape["buckets"] if shape["buckets"] > 0 else shape["max_position"]
    per_head_kv = 2 * shape["length"] * shape["head_dim"] * e
    tables = 2 * 2 * span * shape["heads"] * shape["head_dim"] * e
    lines += ["", f"DRAM floor of the whole step (kernels and host ops, each tensor once): {floor / 1e9:.2f} GB; "
              f"load requests of the three kernels: {requested / 1e9:.2f} GB. For the re-loads to be L2 hits, L2 "
              f"holds the projected tables of both terms ({tables / 1e6:.1f} MB for all heads, re-read by every "
              f"tile) and the K/V (or Q/dO) of the heads in flight ({per_head_kv / 1e3:.0f} kB per head; the "
              f"tiles of one head are neighbours on grid axis 0, so they run together)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for key, value in V3_BASE.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=value)
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--requests", action="store_true",
                        help="also the load requests per kernel (in-kernel re-reads included) beside the DRAM floor")
    parser.add_argument("--arch", type=int, choices=(80, 90), default=90, help="pinned tiling of this sm_XX")
    parser.add_argument("--design-at", metavar="REV", help="count the kernel module of this git revision instead "
                        "(831ec8e: the design with (B, N, L, 2k) tables and fp32 run sums)")
    args = parser.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    shape = {key: getattr(args, key) for key in V3_BASE}
    totals = count(**shape, dtype=dtype, design=earlier_design(args.design_at) if args.design_at else None)
    for step, moved in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"{moved / 1e6:10.1f} MB  {step}")
    total = sum(totals.values())
    print(f"{total / 1e9:10.3f} GB  total, forward + backward ({args.dtype}, {shape})")
    flops = model_flops(**shape)
    print(f"{flops / 1e12:10.3f} TFLOP model FLOPs, forward + backward (QK^T, PV, c2p and p2c; backward 2x): "
          f"{flops / total:,.0f} FLOP per byte of the DRAM floor")
    report = {"shape": shape, "dtype": args.dtype, "bytes": totals, "total": total, "model_flops": flops}
    if args.requests:
        print()
        print(requests_table(shape, args.dtype, args.arch, totals))
        report["load_requests"] = load_requests(**shape, dtype=args.dtype, arch=args.arch)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Attention core alone: the fused Triton kernel against the reference path (plain PyTorch, the computation HF
DebertaV2 performs) and against flash SDPA without relative positions (the floor), forward + backward.

For each (batch, length) it reports milliseconds per forward+backward, peak memory above the inputs, and the
largest deviation of the kernel's output and gradients from the fp32 reference (relative to the reference's largest
magnitude), in one process and one run, so the ratios compare like with like.

    python bench/attention_bench.py                          # GPU: v3-base heads, L=512 (B=32) and L=2048 (B=8)
    python bench/attention_bench.py --device cpu --tiny      # smoke run (Triton's interpreter on CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if "--device" in sys.argv and "cpu" in sys.argv:  # the kernel runs in Triton's interpreter on CPU (before import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data_prep.atomic_io import write_atomic  # noqa: E402
from pretrain.model.attention import reference_attention, triton_attention  # noqa: E402
from pretrain.model.relative_position import relative_position_index  # noqa: E402


def sdpa_without_positions(q, k, v, pos_key, pos_query, rel_index, mask, scale, dropout_p):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


CORES = {"reference": reference_attention, "triton": triton_attention, "sdpa_no_relative": sdpa_without_positions}


def inputs(batch, heads, length, head_size, buckets, max_position, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def leaf(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device, dtype).requires_grad_()

    # Projections of unit-variance hidden states with v3's init give entries of about this size.
    q, k, v = (leaf(batch, heads, length, head_size) for _ in range(3))
    pos_key, pos_query = leaf(heads, 2 * buckets, head_size), leaf(heads, 2 * buckets, head_size)
    rel_index = relative_position_index(length, length, buckets, buckets, max_position, device=device)
    mask = torch.ones(batch, length, dtype=torch.bool, device=device)
    grad = torch.randn(batch, heads, length, head_size, generator=g).to(device, dtype)
    return q, k, v, pos_key, pos_query, rel_index, mask, grad


def run_once(core, args, grad, scale):
    q, k, v, pos_key, pos_query, rel_index, mask = args
    for t in (q, k, v, pos_key, pos_query):
        t.grad = None
    out = core(q, k, v, pos_key, pos_query, rel_index, mask, scale, 0.0)
    out.backward(grad)
    return out


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_core(core, args, grad, scale, device, warmup, repeats):
    for _ in range(warmup):
        run_once(core, args, grad, scale)
    synchronize(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run_once(core, args, grad, scale)
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device == "cuda" else None
    return statistics.median(times), peak


def deviation(core, args, grad, scale):
    """Max |kernel - fp32 reference| / max |reference| over the output and each gradient."""
    expected_args = tuple(t.detach().float().requires_grad_() if t.is_floating_point() else t for t in args)
    ref_out = run_once(reference_attention, expected_args, grad.float(), scale)
    ref = [ref_out.detach()] + [t.grad for t in expected_args[:5]]
    out = run_once(core, args, grad, scale)
    got = [out.detach().float()] + [t.grad.float() for t in args[:5]]
    names = ["out", "dq", "dk", "dv", "d_pos_key", "d_pos_query"]
    return {n: float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) for n, a, b in zip(names, got, ref)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--shapes", nargs="+", default=["32x512", "8x2048"], help="BATCHxLENGTH pairs")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--buckets", type=int, default=256, help="position_buckets (the table has 2x rows)")
    parser.add_argument("--max-position", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help="2 heads of 16, 16 buckets, shapes 2x40: a smoke run")
    parser.add_argument("--out", default="bench/results/attention_bench.json")
    args = parser.parse_args(argv)
    if args.tiny:
        args.shapes, args.heads, args.head_size, args.buckets, args.max_position = ["2x40"], 2, 16, 8, 32
        args.warmup, args.repeats = 0, 1
        if args.device == "cpu":
            args.dtype = "float32"  # Triton's interpreter has no bf16 tl.dot
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: use --device cpu --tiny for a smoke run")
    dtype = getattr(torch, args.dtype)
    scale = 1.0 / (3 * args.head_size) ** 0.5

    rows = []
    for shape in args.shapes:
        batch, length = (int(x) for x in shape.lower().split("x"))
        q, k, v, pk, pq, rel, mask, grad = inputs(batch, args.heads, length, args.head_size, args.buckets,
                                                  args.max_position, dtype, args.device)
        tensors = (q, k, v, pk, pq, rel, mask)
        row = {"batch": batch, "length": length, "deviation_vs_fp32_reference": deviation(triton_attention, tensors,
                                                                                          grad, scale)}
        for name, core in CORES.items():
            try:
                ms, peak = time_core(core, tensors, grad, scale, args.device, args.warmup, args.repeats)
                row[name] = {"ms_fwd_bwd": ms, "peak_gib": peak}
            except torch.cuda.OutOfMemoryError:
                row[name] = {"status": "oom"}
                torch.cuda.empty_cache()
        if "ms_fwd_bwd" in row["reference"] and "ms_fwd_bwd" in row["triton"]:
            row["speedup_vs_reference"] = row["reference"]["ms_fwd_bwd"] / row["triton"]["ms_fwd_bwd"]
        rows.append(row)
        del q, k, v, pk, pq, grad, tensors

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"attention core fwd+bwd, {device_name}, {args.heads} heads x {args.head_size}, {args.dtype}, "
          f"{2 * args.buckets} relative rows")
    print(f"{'shape':>10} | {'reference ms':>12} | {'triton ms':>9} | {'sdpa ms':>8} | {'speed-up':>8} | "
          f"{'ref GiB':>7} | {'triton GiB':>10} | max rel. dev.")
    for r in rows:
        def cell(name, key):
            value = r[name].get(key)
            return f"{value:.2f}" if isinstance(value, float) else r[name].get("status", "-")
        print(f"{r['batch']:>4}x{r['length']:<5} | {cell('reference', 'ms_fwd_bwd'):>12} | "
              f"{cell('triton', 'ms_fwd_bwd'):>9} | {cell('sdpa_no_relative', 'ms_fwd_bwd'):>8} | "
              f"{r.get('speedup_vs_reference', float('nan')):>7.1f}x | {cell('reference', 'peak_gib'):>7} | "
              f"{cell('triton', 'peak_gib'):>10} | {max(r['deviation_vs_fp32_reference'].values()):.1e}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"date": time.strftime("%Y-%m-%d"), "device": device_name, "torch": torch.__version__, "args": vars(args),
              "rows": rows}
    write_atomic(out, json.dumps(report, indent=2), temp=out.with_suffix(".tmp"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Registers, spills, shared memory and MMA kind of every attention-kernel variant, compiled ahead of time for
sm_80 and sm_90 on this machine (no GPU needed), and the choice of the pinned launch configurations.

    python bench/kernel_resources.py                       # table of the pinned variants (markdown), sm_90 + sm_80
    python bench/kernel_resources.py --json out.json       # ... and every row as JSON
    python bench/kernel_resources.py --clean-candidates clean-3.9.json     # which candidate tiles compile clean
    PYTHONPATH=DIR_WITH_TRITON_3.6 python bench/kernel_resources.py --clean-candidates clean-3.6.json
    python bench/kernel_resources.py --pin clean-3.9.json clean-3.6.json   # rewrite pinned_configs.json

Choosing the pinned configurations: ``--clean-candidates`` compiles every candidate of :data:`CANDIDATES` (bf16,
with and without dropout) for sm_90 and sm_80 and keeps those that neither spill nor exceed the card's shared
memory; ``--pin`` takes, per (arch, kernel, head size), the first candidate in order of preference that is clean
under every Triton release analysed (the project's, and the one GPU images ship). fp16 takes the bf16 tiles; fp32
(the exact mode, no tensor cores) the smallest tile, as a correctness path.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, stated (it warns otherwise)
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from data_prep.atomic_io import write_text_atomic  # noqa: E402
from pretrain.model.triton_aot import (  # noqa: E402
    ALL_TERMS,
    BOTH_TERMS,
    DTYPES,
    HEAD_DIMS,
    Variant,
    compile_rows,
    pinned_variants,
)
from pretrain.model.triton_attention import KERNELS, PINNED_CONFIGS_FILE, LaunchConfig  # noqa: E402

ARCHS = (90, 80)
# Preference order: larger tiles first (fewer programs re-reading the same keys; wgmma needs 64 query rows per
# warp group). Head size 128 (no DeBERTa release uses it) only gets small tiles.
CANDIDATES = {
    (64, "forward"): [(64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2), (32, 32, 4, 1), (16, 16, 4, 1)],
    (64, "backward_query"): [(64, 64, 8, 2), (64, 32, 8, 2), (32, 32, 8, 2), (32, 32, 4, 2), (32, 16, 4, 1),
                             (16, 16, 4, 1)],
    (64, "backward_key"): [(64, 64, 8, 2), (64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 8, 2), (32, 32, 4, 2),
                           (16, 32, 4, 1), (16, 16, 4, 1)],
}
for _kernel in KERNELS:
    CANDIDATES[(128, _kernel)] = [(32, 32, 4, 2), (16, 32, 4, 1), (16, 16, 4, 1), (16, 16, 2, 1)]
FP32_CONFIG = (16, 16, 4, 1)  # the exact mode (no tensor cores) is a correctness path: smallest tile


def clean_candidates(workers: int) -> dict[str, list]:
    """Per "arch/kernel/head size": the candidates that compile in bf16, with and without dropout, without spills
    and within the card's shared memory, with the Triton installed here."""
    jobs, keys = [], []
    for arch in ARCHS:
        for (head_dim, kernel), candidates in CANDIDATES.items():
            for candidate in candidates:
                for dropout in (False, True):
                    jobs.append((Variant(kernel, "bf16", head_dim, dropout, LaunchConfig(*candidate)), arch))
                    keys.append((f"{arch}/{kernel}/{head_dim}", candidate))
    clean: dict[str, list] = {}
    verdict: dict[tuple, bool] = {}
    for key, row in zip(keys, compile_rows(jobs, workers)):
        verdict[key] = verdict.get(key, True) and row["status"] == "ok" and not row["problems"]
    for (name, candidate), ok in verdict.items():
        clean.setdefault(name, [])
        if ok:
            clean[name].append(list(candidate))
    return clean


def pin(clean_per_triton: list[dict[str, list]]) -> dict[str, list[int]]:
    """The first candidate clean under every Triton release analysed; fp16 takes bf16's tiles (same registers)."""
    table = {}
    for arch in ARCHS:
        for (head_dim, kernel), candidates in CANDIDATES.items():
            name = f"{arch}/{kernel}/{head_dim}"
            chosen = next((list(c) for c in candidates if all(list(c) in clean.get(name, []) for clean in
                                                              clean_per_triton)), list(candidates[-1]))
            for dtype in ("bf16", "fp16"):
                table[f"{arch}/{kernel}/{dtype}/{head_dim}"] = chosen
            table[f"{arch}/{kernel}/fp32/{head_dim}"] = list(FP32_CONFIG)
    return table


def markdown(rows: list[dict]) -> str:
    lines = ["| arch | kernel | dtype | d | dropout | tile (M x N, warps, stages) | registers | spills (B/thread) "
             "| shared memory | MMA |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['arch']} | {r['kernel']} | {r['dtype']} | {r['head_dim']} | {r['dropout']} | "
                         f"| compile error: {r['error']} | | | |")
            continue
        c = r["config"]
        lines.append(
            f"| {r['arch']} | {r['kernel']} | {r['dtype']} | {r['head_dim']} | {'yes' if r['dropout'] else 'no'} "
            f"| {c['block_m']}x{c['block_n']}, {c['num_warps']}, {c['num_stages']} | {r['registers']} "
            f"| {r['spill_store_bytes']} | {r['shared_bytes'] // 1024} KiB | {r['mma']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities (90 = H100)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS))
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    parser.add_argument("--config", type=int, nargs=4, metavar=("BLOCK_M", "BLOCK_N", "WARPS", "STAGES"),
                        help="compile this tile instead of the pinned ones")
    parser.add_argument("--no-dropout", action="store_true", help="only the variants without dropout")
    parser.add_argument("--all-terms", action="store_true",
                        help="also c2p-only, p2c-only and no position terms (default: both, as DeBERTa uses)")
    parser.add_argument("--json", type=Path, help="also write every row here")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--clean-candidates", type=Path, metavar="OUT.json",
                        help="compile every candidate tile with this Triton and write the ones that compile clean")
    parser.add_argument("--pin", type=Path, nargs="+", metavar="CLEAN.json",
                        help="rewrite pinned_configs.json: per kernel the preferred tile clean in all these analyses")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    if args.clean_candidates:
        import triton

        found = {"triton": triton.__version__, "clean": clean_candidates(args.jobs)}
        args.clean_candidates.write_text(json.dumps(found, indent=1) + "\n")
        print(f"clean candidates for Triton {triton.__version__} -> {args.clean_candidates} "
              f"({time.perf_counter() - started:.0f} s)")
        return 0
    if args.pin:
        analyses = [json.loads(path.read_text()) for path in args.pin]
        table = pin([a["clean"] for a in analyses])
        entries = ",\n".join(f"  {json.dumps(key)}: {json.dumps(table[key])}" for key in sorted(table))
        write_text_atomic(PINNED_CONFIGS_FILE, f'{{"triton_releases_analysed": '
                          f'{json.dumps([a["triton"] for a in analyses])},\n "configs": {{\n{entries}\n }}\n}}\n')
        print(f"wrote {PINNED_CONFIGS_FILE}")
        return 0
    dropouts = (False,) if args.no_dropout else (False, True)
    terms = ALL_TERMS if args.all_terms else BOTH_TERMS
    variants = {arch: pinned_variants(arch, dtypes=args.dtypes, head_dims=args.head_dims, dropouts=dropouts,
                                      kernel_names=args.kernels, terms=terms) for arch in args.arch}
    if args.config:
        variants = {arch: [dataclasses.replace(v, config=LaunchConfig(*args.config)) for v in found
                           if v.kernel in KERNELS] for arch, found in variants.items()}
    jobs = [(variant, arch) for arch, found in variants.items() for variant in found]
    rows = compile_rows(jobs, args.jobs)
    print(markdown(rows))
    import triton

    print(f"\n{len(rows)} variants, Triton {triton.__version__}, {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"triton": triton.__version__, "rows": rows}, indent=1))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

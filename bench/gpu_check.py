"""Python side of ``bench/gpu_check.sh``: the environment and self-check stages, and the final report.

    python bench/gpu_check.py environment --out OUT/environment.json
    python bench/gpu_check.py self-check --device cuda --out OUT/self_check.json
    python bench/gpu_check.py report --out OUT --dry-run 0 --total-seconds 412 --budget 480

Needs only torch, triton and this checkout (no Hydra, omegaconf, Lightning or DeepSpeed), like the GPU image.
The report reads the stage table the shell script wrote (``gpu_check_stages.tsv``: name, exit code, seconds,
limit) and each stage's own output, and writes ``gpu_check.json`` and ``gpu_check.md``: one row per stage with
its status (ok, timeout, failed, skipped), time, limit and key figures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

if str(REPO / "bench") not in sys.path:
    sys.path.insert(0, str(REPO / "bench"))
from data_prep.atomic_io import write_atomic, write_json_atomic  # noqa: E402

# In order of value (the order gpu_check.sh runs them): our step rows right after the self-check that gates them.
STAGE_ORDER = ("environment", "self_check", "step_512", "kernel_tests", "attention_bench", "step_long")
TIMEOUT_CODES = {124, 137}  # `timeout` exit codes: TERM after the limit, KILL after the grace period
# (dtype, head size) of the self-check stage: the configurations the kernel tests also compile.
# Head sizes 64 and 128 in every dtype the host code launches; each check also runs the dropout variants.
GPU_SELF_CHECKS = (("bfloat16", 64), ("bfloat16", 128), ("float16", 64), ("float16", 128), ("float32", 64),
                   ("float32", 128))
DRY_RUN_SELF_CHECKS = (("float32", 16), ("float16", 16))  # the interpreter has no bf16 tl.dot


# ------------------------------------------------------------------------------------------------ stages


def environment(out: Path) -> int:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    for package in ("triton", "numpy", "transformers", "pytest", "disentangled_flash"):
        try:
            info[package] = __import__(package).__version__
        except Exception as err:  # reported, not fatal: later stages say what they miss
            info[package] = f"not importable ({type(err).__name__})"
    info["device_name"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no CUDA device)"
    try:
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.SubprocessError) as err:
        info["nvidia_smi"] = f"unavailable ({type(err).__name__})"
    print(json.dumps(info, indent=2))
    write_json_atomic(out, info)
    return 0


def self_check(device: str, out: Path) -> int:
    """``attention_backend=auto``'s self-check for each training configuration; exit 1 when any fails (auto would
    fall back to the reference path on this card)."""
    import torch

    from kernel_fault import inject_if_requested
    from pretrain.model import attention

    inject_if_requested()
    configs = DRY_RUN_SELF_CHECKS if device == "cpu" else GPU_SELF_CHECKS
    if device == "cpu":  # the interpreter stands in for CUDA (dry run)
        attention.KERNEL_DEVICE_TYPES = ("cuda", "cpu")
    results = []
    for dtype, head_dim in configs:
        plan = attention.plan_attention("auto", device, getattr(torch, dtype), head_dim, True, True)
        print(plan["check"]["summary"] if plan["check"] else plan["reason"], flush=True)
        results.append(plan)
    write_json_atomic(out, {"device": device, "plans": results})
    return 0 if all(p["fused"] for p in results) else 1


# ------------------------------------------------------------------------------------------------ report


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def environment_figures(out: Path) -> tuple[dict[str, Any], str | None]:
    info = read_json(out / "environment.json") or {}
    keys = ("device_name", "torch", "triton", "numpy", "transformers", "pytest", "disentangled_flash")
    return {k: info.get(k) for k in keys}, None if info else "no environment.json"


def self_check_figures(out: Path) -> tuple[dict[str, Any], str | None]:
    data = read_json(out / "self_check.json")
    if not data:
        return {}, "no self_check.json"
    figures, failed = {}, []
    for plan in data["plans"]:
        check = plan["check"] or {}
        label = f"{check.get('dtype')} d{check.get('head_dim')}"
        errors = [e["max_rel"] for e in check.get("errors", {}).values() if e["max_rel"] is not None]
        elementwise = [e["elem_rel"] for e in check.get("errors", {}).values() if e.get("elem_rel") is not None]
        figures[label] = {"passed": check.get("passed"), "worst_max_rel": max(errors) if errors else None,
                          "tolerance": check.get("tolerance_max_rel"),
                          "worst_elem_rel": max(elementwise) if elementwise else None,
                          "elem_tolerance": check.get("tolerance_elem_rel"), "exception": check.get("exception")}
        if not plan["fused"]:
            failed.append(label)
    return figures, f"self-check failed: {', '.join(failed)}" if failed else None


def kernel_test_figures(out: Path) -> tuple[dict[str, Any], str | None]:
    try:
        suite = ET.parse(out / "kernel_tests.xml").getroot()
    except (OSError, ET.ParseError):
        return {}, "no kernel_tests.xml (pytest did not run)"
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = [f"{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    figures = {**counts, "failed_tests": failed}
    if counts["passed"] == 0:
        return figures, "no test passed"
    return figures, f"{len(failed)} test(s) failed" if failed else None


def attention_bench_figures(out: Path) -> tuple[dict[str, Any], str | None]:
    data = read_json(out / "attention_bench.json")
    if not data or not data.get("rows"):
        return {}, "no attention_bench.json"
    row = data["rows"][0]
    figures = {"shape": f"{row['batch']}x{row['length']}", "dtype": data["args"]["dtype"]}
    for core in ("triton", "reference", "sdpa_no_relative"):
        figures[f"{core}_ms"] = row.get(core, {}).get("ms_fwd_bwd", row.get(core, {}).get("status"))
    figures["speedup_vs_reference"] = row.get("speedup_vs_reference")
    figures["max_rel_deviation"] = max(row["deviation_vs_fp32_reference"].values())
    return figures, None


def row_failed(contestant: str, status: str) -> bool:
    """As ``gpu_step_bench.row_failed``: not ok and not skipped, except a baseline out of memory (a result: that
    baseline does not fit the shape); an oom of ours fails."""
    if status == "ok" or status.startswith("skipped"):
        return False
    return not (status.startswith("oom") and not contestant.startswith("ours_"))


def step_figures(name: str) -> Callable[[Path], tuple[dict[str, Any], str | None]]:
    """Per row: status, tokens/s, MFU, speed-up over the HF baseline and peak GPU memory, keyed by contestant, or
    ``contestant@L`` when the stage runs several sequence lengths (step_long: 2048 and 4096)."""
    def figures(out: Path) -> tuple[dict[str, Any], str | None]:
        data = read_json(out / f"{name}.json")
        if not data:
            return {}, f"no {name}.json"
        several = len({r["seq_len"] for r in data["rows"]}) > 1
        rows = {}
        for r in data["rows"]:
            key = f"{r['contestant']}@{r['seq_len']}" if several else r["contestant"]
            rows[key] = {"status": r["status"], "tokens_per_s": r["tokens_per_s"], "mfu": r["mfu"],
                         "vs_baseline": r.get("vs_baseline"), "peak_mem_gib": r["peak_mem_gib"]}
            if several:
                rows[key]["batch_size"] = r["batch_size"]
            if "attention_fused" in r:
                rows[key]["attention_fused"] = r["attention_fused"]
        invalid = [n for n, r in rows.items() if r["status"].startswith("invalid")]
        bad = [n for n, r in rows.items()
               if row_failed(n.split("@")[0], r["status"]) and not r["status"].startswith("invalid")]
        problems = ([f"INVALID (the fused kernel did not run): {', '.join(invalid)}"] if invalid else []) + \
            ([f"rows not ok: {', '.join(bad)}"] if bad else [])
        return rows, "; ".join(problems) or None
    return figures


FIGURES = {"environment": environment_figures, "self_check": self_check_figures,
           "kernel_tests": kernel_test_figures, "attention_bench": attention_bench_figures,
           "step_512": step_figures("step_512"), "step_long": step_figures("step_long")}


def read_stages(out: Path) -> dict[str, dict[str, Any]]:
    stages = {}
    path = out / "gpu_check_stages.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        fields = line.split("\t")
        stages[fields[0]] = {"rc": fields[1], "seconds": int(fields[2]), "limit": int(fields[3]),
                             "note": fields[4] if len(fields) > 4 else None}
    return stages


def stage_status(raw: dict[str, Any] | None, problem: str | None) -> str:
    """ok only when the command exited 0 and its output shows nothing wrong."""
    if raw is None:
        return "missing: the stage did not run"
    if raw["rc"] == "skipped":
        return f"skipped: {raw['note']}"
    rc = int(raw["rc"])
    if rc in TIMEOUT_CODES:
        return f"timeout after {raw['limit']} s" + (f" ({problem})" if problem else " (partial results)")
    if rc != 0:
        return f"failed (exit {rc})" + (f": {problem}" if problem else "")
    return f"failed: {problem}" if problem else "ok"


def summarize(figures: dict[str, Any]) -> str:
    """Key figures as one table cell."""
    parts = []
    for key, value in figures.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k}={fmt(v)}" for k, v in value.items() if v is not None)
            parts.append(f"{key}: {inner}")
        elif value not in (None, [], ""):
            parts.append(f"{key}={fmt(value)}")
    return "; ".join(parts).replace("|", "/")


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def report(out: Path, dry_run: bool, total_seconds: int, budget: int, limits_enforced: bool = True) -> int:
    raw = read_stages(out)
    stages = []
    for name in STAGE_ORDER:
        figures, problem = FIGURES[name](out) if name in raw and raw[name]["rc"] != "skipped" else ({}, None)
        entry = raw.get(name)
        stages.append({"stage": name, "status": stage_status(entry, problem),
                       "seconds": entry["seconds"] if entry else None, "limit": entry["limit"] if entry else None,
                       "figures": figures, "log": f"{name}.log"})
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "dry_run": dry_run,
              "total_seconds": total_seconds, "budget_seconds": budget, "limits_enforced": limits_enforced,
              "stages": stages}
    write_json_atomic(out / "gpu_check.json", result)
    lines = [f"GPU check {result['date']}{' (dry run: CPU, interpreter, tiny shapes)' if dry_run else ''}, "
             f"{total_seconds} s of {budget} s" + ("" if limits_enforced else " (untimed: limits not enforced)"), "",
             "| stage | status | seconds | limit | key figures |",
             "|---|---|---|---|---|"]
    for s in stages:
        lines.append(f"| {s['stage']} | {s['status']} | {fmt(s['seconds'])} | {fmt(s['limit'])} | "
                     f"{summarize(s['figures'])} |")
    markdown = "\n".join(lines) + "\n"
    write_atomic(out / "gpu_check.md", markdown, temp=out / "gpu_check.md.tmp")
    print(markdown)
    print(f"results: {out / 'gpu_check.json'}, {out / 'gpu_check.md'}")
    return 0 if all(s["status"] == "ok" or s["status"].startswith("skipped") for s in stages) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    env = commands.add_parser("environment", help="versions and the device")
    env.add_argument("--out", type=Path, required=True)
    check = commands.add_parser("self-check", help="attention_backend=auto's self-check per training configuration")
    check.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    check.add_argument("--out", type=Path, required=True)
    rep = commands.add_parser("report", help="gpu_check.json and gpu_check.md from the stages' outputs")
    rep.add_argument("--out", type=Path, required=True)
    rep.add_argument("--dry-run", type=int, choices=(0, 1), default=0)
    rep.add_argument("--total-seconds", type=int, required=True)
    rep.add_argument("--budget", type=int, required=True)
    rep.add_argument("--limits-enforced", type=int, choices=(0, 1), default=1,
                     help="0: an untimed dry run (GPU_CHECK_UNTIMED=1) ran the stages without their limits")
    args = parser.parse_args(argv)
    if args.command == "environment":
        return environment(args.out)
    if args.command == "self-check":
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                parser.error("no CUDA device: use --device cpu (with TRITON_INTERPRET=1) for a dry run")
        return self_check(args.device, args.out)
    return report(args.out, bool(args.dry_run), args.total_seconds, args.budget, bool(args.limits_enforced))


if __name__ == "__main__":
    sys.exit(main())

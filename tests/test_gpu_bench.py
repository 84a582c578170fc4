"""CPU smoke run of the GPU training-step benchmark (bench/gpu_step_bench.py), as a user runs it: a subprocess.

No GPU here, so this checks the plumbing a GPU run relies on (every CPU-capable contestant builds, trains and is
measured; the JSON and the table are written; the loss-curve check runs both backends), not the speed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONTESTANTS = ["hf_mlm_eager", "hf_rtd_compiled", "ours_mlm", "ours_rtd"]  # hf_rtd_compiled runs eager (--no-compile)
CHECK_STEPS = 5


def test_cpu_smoke_run_writes_rows_check_and_table(tmp_path):
    out = tmp_path / "r.json"
    command = [sys.executable, str(REPO / "bench" / "gpu_step_bench.py"), "--device", "cpu", "--tiny", "--no-compile",
               "--steps", "2", "--warmup", "1", "--seq-lens", "64", "--batch-sizes", "2",
               "--check-steps", str(CHECK_STEPS), "--out", str(out), "--contestants", *CONTESTANTS]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "2"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]

    report = json.loads(out.read_text())
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temporary file behind
    assert report["torch"] and report["transformers"] and report["device_name"]
    assert report["matmul_ceiling_tflops"] > 0
    assert report["args"]["contestants"] == CONTESTANTS
    rows = {r["contestant"]: r for r in report["rows"]}
    assert list(rows) == CONTESTANTS
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row["status"])
        assert (row["seq_len"], row["batch_size"]) == (64, 2)
        assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0, name
        assert math.isfinite(row["mfu"]) and row["mfu"] > 0, name
        assert math.isfinite(row["final_loss"]), name
        assert row["flops_formula"].startswith("training_flops_per_token(")
        assert row["peak_mem_gib"] is None  # no CUDA allocator to ask on CPU
        assert row["compiled"] is False
    # HF has no EMD, ours trains through it: the FLOP count must follow each model
    assert "use_emd=False" in rows["hf_mlm_eager"]["flops_formula"]
    assert "use_emd=True" in rows["ours_mlm"]["flops_formula"]
    assert rows["ours_mlm"]["flops_per_token"] > rows["hf_mlm_eager"]["flops_per_token"]
    assert rows["ours_rtd"]["flops_per_token"] > rows["ours_mlm"]["flops_per_token"]
    assert rows["ours_mlm"]["attention_backend"] == report["attention_backend_used"]
    # the RTD baseline ran, so RTD rows have a ratio against it; the MLM baseline (hf_mlm_compiled) did not
    assert rows["hf_rtd_compiled"]["vs_baseline"] == 1.0
    assert rows["ours_rtd"]["vs_baseline"] > 0
    assert rows["ours_mlm"]["vs_baseline"] is None

    check = report["check"]
    curves = check["curves"]
    assert set(curves) == {"backend", "reference"}
    for losses in curves.values():
        assert len(losses) == CHECK_STEPS and all(x is not None and math.isfinite(x) for x in losses)
    assert check["verdict"] == "PASS"  # on CPU both runs compute the reference path (or track it within tolerance)
    assert check["reference_backend"] == "reference"
    assert check["max_abs_diff"] >= 0 and check["tail_mean_ratio"] > 0

    table = [line for line in done.stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| contestant | seq | batch | tokens/s | MFU % | peak GiB |")
    for name in CONTESTANTS:
        assert any(line.startswith(f"| {name} | 64 | 2 |") for line in table), name
    assert f"check ({check['objective']}, {CHECK_STEPS} steps" in done.stdout


def test_attention_bench_cpu_smoke_run(tmp_path):
    """bench/attention_bench.py on CPU (the kernel in Triton's interpreter): the kernel's deviation from the fp32
    reference is reported and tiny, every core is timed, and the JSON is written."""
    import pytest

    pytest.importorskip("triton", reason="the `triton` package is not installed (pip install -e '.[test]')")
    out = tmp_path / "attention.json"
    command = [sys.executable, str(REPO / "bench" / "attention_bench.py"), "--device", "cpu", "--tiny", "--out", str(out)]
    done = subprocess.run(command, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "2"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert set(row["deviation_vs_fp32_reference"]) == {"out", "dq", "dk", "dv", "d_pos_key", "d_pos_query"}
    assert max(row["deviation_vs_fp32_reference"].values()) < 1e-5
    for core in ("reference", "triton", "sdpa_no_relative"):
        assert row[core]["ms_fwd_bwd"] > 0
    assert "2x40" in done.stdout

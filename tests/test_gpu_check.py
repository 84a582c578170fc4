"""The GPU check (bench/gpu_check.sh) cannot rot between GPU sessions: its dry run executes every stage on CPU, and
the code it runs imports on a GPU image that has none of the training stack.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
STAGES = ["environment", "self_check", "step_512", "kernel_tests", "attention_bench", "step_long"]
STEP_512_ROWS = ["ours_rtd", "ours_mlm", "hf_rtd_compiled", "hf_mlm_compiled", "hf_mlm_eager"]  # in order of value
# The long-context rows in order of value: ours at both lengths first (2048 and 4096 on the GPU, 16 and 24 in the
# dry run), then the baselines
LONG_ROWS = ["ours_mlm@16", "ours_mlm@24", "hf_mlm_compiled@16", "hf_mlm_compiled@24", "hf_mlm_disentangled_flash@16",
             "hf_mlm_disentangled_flash@24"]
# Each stage's time limit on the GPU (bench/gpu_check.sh; step_long gets at most 240 s of what is left of 480 s).
LIMITS = {"environment": 15, "self_check": 140, "step_512": 180, "kernel_tests": 120, "attention_bench": 60,
          "step_long": 240}
# What the GPU image lacks (or, for Lightning, what pretrain.model and the benchmarks must not need).
MISSING_ON_GPU_IMAGE = ["hydra", "omegaconf", "lightning", "pytorch_lightning", "deepspeed", "datasets", "jieba",
                        "wandb"]

BLOCKER = """
import importlib.abc, sys
BLOCKED = set({blocked!r})

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: not on the GPU image)", name=name)
        return None

sys.meta_path.insert(0, Blocker())
"""

IMPORTS = """
import importlib.util, sys
sys.path.insert(0, {repo!r})
import pretrain.model, pretrain.objectives, pretrain.objectives.build, pretrain.model.attention_check
for script in ("bench/gpu_step_bench.py", "bench/attention_bench.py", "bench/gpu_check.py"):
    spec = importlib.util.spec_from_file_location(script.split("/")[1][:-3], {repo!r} + "/" + script)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look themselves up here
    spec.loader.exec_module(module)
print("imported without the training stack")
import omegaconf  # the blocker works: this must fail
"""


def test_model_objectives_and_benchmarks_import_without_the_training_stack():
    code = BLOCKER.format(blocked=MISSING_ON_GPU_IMAGE) + IMPORTS.format(repo=str(REPO))
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    # Everything before the marker imported; the failing last import proves the blocker was active.
    assert done.stdout.strip() == "imported without the training stack", done.stderr[-3000:]
    assert done.returncode == 1
    assert done.stderr.strip().endswith("No module named 'omegaconf' (blocked: not on the GPU image)"), done.stderr


def dry_run(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    """The dry run, untimed (GPU_CHECK_UNTIMED=1): its stage limits and row shares are the GPU lease's, and beside
    other work (the suite runs in two processes) a CPU can miss them; what the tests judge is what each stage
    computes and reports. That the limits are enforced is tested where no wall clock decides: the report's timeout
    verdicts below, a row past its share, and the refusal of an untimed GPU run. The 30-minute timeout only stops a
    hang: about 1.5 min on an idle 2-core machine, over 10 min beside a dozen busy processes."""
    pytest.importorskip("triton", reason="the `triton` package is not installed (pip install -e '.[test]')")
    out = tmp_path / "results"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_CHECK_CACHE": str(tmp_path / "cache"),
           "WANDB_MODE": "disabled", "GPU_CHECK_UNTIMED": "1", **env}
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1800)
    return done, out


@pytest.mark.skipif(sys.platform != "linux", reason="bench/gpu_check.sh uses GNU timeout")
def test_dry_run_runs_every_stage_and_writes_json_and_markdown(tmp_path):
    done, out = dry_run(tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]

    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True and report["budget_seconds"] == 480 and report["limits_enforced"] is False
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == STAGES
    for name, stage in stages.items():
        assert stage["status"] == "ok", (name, stage["status"], (out / f"{name}.log").read_text()[-2000:])
        assert stage["seconds"] >= 0 and stage["limit"] == LIMITS[name], name
        assert stage["figures"], name
    figures = {name: stage["figures"] for name, stage in stages.items()}
    assert all(check["passed"] for check in figures["self_check"].values())
    assert figures["kernel_tests"]["passed"] >= 4 and figures["kernel_tests"]["failures"] == 0
    assert figures["attention_bench"]["max_rel_deviation"] < 1e-5
    assert list(figures["step_512"]) == STEP_512_ROWS
    assert all(row["tokens_per_s"] > 0 for row in figures["step_512"].values())
    # our rows ran the fused kernel (the interpreter standing in for CUDA), as on the GPU
    assert figures["step_512"]["ours_rtd"]["attention_fused"] is True
    assert figures["step_512"]["ours_mlm"]["attention_fused"] is True
    long_rows = figures["step_long"]
    assert list(long_rows) == LONG_ROWS
    for key in LONG_ROWS[:4]:
        assert long_rows[key]["status"] == "ok" and long_rows[key]["tokens_per_s"] > 0, key
        assert long_rows[key]["batch_size"] == 1 and long_rows[key]["peak_mem_gib"] is None, key  # (no CUDA)
    assert long_rows["ours_mlm@16"]["attention_fused"] is True and long_rows["ours_mlm@24"]["attention_fused"] is True
    assert long_rows["ours_mlm@24"]["vs_baseline"] > 0  # against hf_mlm_compiled at the same length
    assert all(long_rows[key]["status"].startswith("skipped") for key in LONG_ROWS[4:])
    assert not list(out.glob("*.tmp"))

    table = (out / "gpu_check.md").read_text().splitlines()
    assert "| stage | status | seconds | limit | key figures |" in table
    for name in STAGES:
        assert any(line.startswith(f"| {name} | ok | ") for line in table), name
    assert "no .whl/ directory: nothing installed" in done.stdout
    assert "(untimed: limits not enforced)" in table[0]


def test_an_untimed_gpu_check_is_refused(tmp_path):
    """GPU_CHECK_UNTIMED belongs to the dry run: the GPU check itself never runs without its limits."""
    env = {**os.environ, "OUT": str(tmp_path / "results"), "PYTHON": sys.executable, "GPU_CHECK_UNTIMED": "1"}
    env.pop("GPU_CHECK_DRY_RUN", None)
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: GPU_CHECK_UNTIMED=1 applies only to the dry run (--dry-run); unset it: the GPU check always enforces "
        "its time limits"]
    assert not (tmp_path / "results").exists()


def test_report_marks_failed_timed_out_and_missing_stages(tmp_path):
    """The report's verdicts come from the exit codes and the stages' own outputs, not from their presence."""
    (tmp_path / "gpu_check_stages.tsv").write_text(
        "environment\t0\t1\t15\nself_check\t1\t3\t60\nkernel_tests\t124\t150\t150\nstep_long\tskipped\t0\t40\t"
        "only 50s of the 480s budget left\n")
    (tmp_path / "environment.json").write_text(json.dumps({"device_name": "NVIDIA H200", "torch": "2.11"}))
    plan = {"fused": False, "check": {"dtype": "bfloat16", "head_dim": 64, "passed": False, "tolerance_max_rel": 0.05,
                                      "errors": {"out": {"max_abs": 3.0, "max_rel": 0.9}}, "exception": None}}
    (tmp_path / "self_check.json").write_text(json.dumps({"device": "cuda", "plans": [plan]}))
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "report", "--out", str(tmp_path),
                           "--total-seconds", "300", "--budget", "480"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    stages = {s["stage"]: s for s in json.loads((tmp_path / "gpu_check.json").read_text())["stages"]}
    assert stages["environment"]["status"] == "ok"
    assert stages["self_check"]["status"] == "failed (exit 1): self-check failed: bfloat16 d64"
    assert stages["self_check"]["figures"]["bfloat16 d64"]["worst_max_rel"] == 0.9
    assert stages["kernel_tests"]["status"].startswith("timeout after 150 s")
    assert stages["attention_bench"]["status"] == "missing: the stage did not run"
    assert stages["step_long"]["status"] == "skipped: only 50s of the 480s budget left"


@pytest.mark.skipif(sys.platform != "linux", reason="bench/gpu_check.sh uses GNU timeout")
def test_dry_run_under_the_triton_of_gpu_images(tmp_path):
    """The GPU image's Triton (3.6) with today's NumPy (>= 2.4): its interpreter needs the fix in
    pretrain/model/triton_interpreter.py, or every interpreted launch fails. The whole dry run, every stage, runs
    under it as it will on the GPU image."""
    from gpu_image_triton import GPU_IMAGE_TRITON, triton_for_gpu_images

    site = triton_for_gpu_images()
    done, out = dry_run(tmp_path, PYTHONPATH=os.pathsep.join([str(site), str(REPO)]))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    stages = {s["stage"]: s for s in json.loads((out / "gpu_check.json").read_text())["stages"]}
    assert stages["environment"]["figures"]["triton"] == GPU_IMAGE_TRITON
    for name in STAGES:
        assert stages[name]["status"] == "ok", (name, stages[name]["status"], (out / f"{name}.log").read_text()[-2000:])
    assert all(check["passed"] for check in stages["self_check"]["figures"].values())
    assert stages["step_512"]["figures"]["ours_rtd"]["attention_fused"] is True
    assert stages["kernel_tests"]["figures"]["passed"] >= 4


@pytest.mark.skipif(sys.platform != "linux", reason="bench/gpu_check.sh uses GNU timeout")
def test_a_kernel_that_fails_its_self_check_makes_our_step_rows_invalid(tmp_path):
    """A broken kernel must not publish the reference path's speed under our name: with a fault injected into the
    kernel's output, the self-check fails, auto falls back, and our step rows are INVALID in the JSON and the
    table, the stage fails and the check exits non-zero. The baselines' rows stay valid."""
    done, out = dry_run(tmp_path, GPU_CHECK_INJECT_FAULT="1", GPU_CHECK_STAGES="step_512")
    assert done.returncode == 1, done.stdout[-4000:] + done.stderr[-2000:]
    stages = {s["stage"]: s for s in json.loads((out / "gpu_check.json").read_text())["stages"]}
    step = stages["step_512"]
    assert step["status"] == "failed (exit 1): INVALID (the fused kernel did not run): ours_rtd, ours_mlm"
    rows = step["figures"]
    assert list(rows) == STEP_512_ROWS
    for name in ("ours_rtd", "ours_mlm"):
        assert rows[name]["status"].startswith("invalid: the fused attention kernel did not run")
        assert rows[name]["attention_fused"] is False
    log = (out / "step_512.log").read_text()
    assert "fused attention self-check (cpu float16 head_dim 16 c2p+p2c" in log and " FAILED: " in log
    assert all(rows[name]["status"] == "ok" for name in STEP_512_ROWS[2:])
    table = (out / "gpu_check.md").read_text()
    assert "| step_512 | failed (exit 1): INVALID (the fused kernel did not run): ours_rtd, ours_mlm |" in table
    assert "ours_rtd: status=invalid" in table


def test_a_row_past_its_share_of_the_stage_says_so_and_the_next_row_runs(tmp_path):
    """A cold compile can take a stage's whole time: the row that overran says where it was, and the rows after
    it still run. Here the first row's share is 1 s (61 s less 60 s kept for the row after it), which the fused
    kernel's first use, its self-check in the interpreter, always exceeds."""
    pytest.importorskip("triton", reason="the `triton` package is not installed (pip install -e '.[test]')")
    out = tmp_path / "step.json"
    command = [sys.executable, str(REPO / "bench" / "gpu_step_bench.py"), "--device", "cpu", "--tiny", "--no-compile",
               "--steps", "1", "--warmup", "0", "--seq-lens", "32", "--batch-sizes", "1", "--interpret-kernel",
               "--time-budget", "61", "--row-reserve", "60", "--contestants", "ours_mlm", "hf_mlm_eager", "--out",
               str(out)]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "WANDB_MODE": "disabled", "TRITON_INTERPRET": "1"})
    assert done.returncode == 1, done.stderr[-3000:]
    rows = {r["contestant"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["ours_mlm"]["status"] == "timeout: model build and compilation exceeded this row's share of 1 s"
    assert rows["ours_mlm"]["tokens_per_s"] is None
    assert rows["hf_mlm_eager"]["status"] == "ok" and rows["hf_mlm_eager"]["tokens_per_s"] > 0
    assert "rows not ok: ours_mlm (timeout:" in done.stderr


def _long_stage_report(tmp_path: Path, hf_4096_status: str, ours_4096_status: str = "ok") -> dict:
    """The report of a step_long stage whose rows are as given (what gpu_step_bench.py writes on a GPU)."""
    def row(name, seq, batch, status, speed, peak):
        ok = status == "ok"
        return {"contestant": name, "seq_len": seq, "batch_size": batch, "status": status,
                "tokens_per_s": speed if ok else None, "mfu": 0.3 if ok else None, "peak_mem_gib": peak,
                "vs_baseline": None}

    tmp_path.mkdir()
    rows = [row("ours_mlm", 2048, 8, "ok", 9e4, 20.5), row("ours_mlm", 4096, 4, ours_4096_status, 8e4, 21.0),
            row("hf_mlm_compiled", 2048, 8, "ok", 3e4, 61.0), row("hf_mlm_compiled", 4096, 4, hf_4096_status, 2e4, 77.9),
            row("hf_mlm_disentangled_flash", 2048, 8, "skipped: not installed", None, None)]
    (tmp_path / "step_long.json").write_text(json.dumps({"rows": rows}))
    (tmp_path / "gpu_check_stages.tsv").write_text(f"step_long\t{0 if ours_4096_status == 'ok' else 1}\t200\t240\n")
    subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "report", "--out", str(tmp_path),
                    "--total-seconds", "470", "--budget", "480"], capture_output=True, text=True, timeout=60)
    return {s["stage"]: s for s in json.loads((tmp_path / "gpu_check.json").read_text())["stages"]}["step_long"]


def test_a_baseline_out_of_memory_at_4096_is_a_result_and_ours_is_a_failure(tmp_path):
    """HF's 4096-token row may not fit the card: it reports `oom: <message>` and the peak it reached, and the stage
    stays ok; the same of a row of ours fails the stage. gpu_step_bench.py's exit code follows the same rule."""
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_step_bench

    message = ("CUDA out of memory. Tried to allocate 3.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
               "1.2 GiB is free.")
    status = gpu_step_bench.failure_status(torch.cuda.OutOfMemoryError(message))
    assert status == "oom: " + message
    wrapped = RuntimeError("backend='inductor' raised:\nRuntimeError: " + message)  # a compiler's wrapping
    assert gpu_step_bench.failure_status(wrapped) == "oom: RuntimeError: " + message
    assert gpu_step_bench.failure_status(ValueError("bad shape\nmore")) == "error: ValueError: bad shape"
    assert not gpu_step_bench.row_failed({"contestant": "hf_mlm_compiled", "status": status})
    assert gpu_step_bench.row_failed({"contestant": "ours_mlm", "status": status})
    assert gpu_step_bench.row_failed({"contestant": "hf_mlm_compiled", "status": "error: ValueError: x"})

    stage = _long_stage_report(tmp_path / "hf", status)
    assert stage["status"] == "ok"
    assert list(stage["figures"]) == ["ours_mlm@2048", "ours_mlm@4096", "hf_mlm_compiled@2048",
                                      "hf_mlm_compiled@4096", "hf_mlm_disentangled_flash@2048"]
    assert stage["figures"]["hf_mlm_compiled@4096"] == {"status": status, "tokens_per_s": None, "mfu": None,
                                                        "vs_baseline": None, "peak_mem_gib": 77.9, "batch_size": 4}
    stage = _long_stage_report(tmp_path / "ours", status, ours_4096_status=status)
    assert stage["status"] == "failed (exit 1): rows not ok: ours_mlm@4096"


def test_rows_run_in_the_order_given(tmp_path):
    """--rows: the long-context stage's plan, ours at both lengths before any baseline."""
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_step_bench

    args = gpu_step_bench.parse_args(["--device", "cpu", "--tiny", "--rows", "ours_mlm:2048x8", "ours_mlm:4096x4",
                                      "hf_mlm_compiled:2048x8", "--out", str(tmp_path / "x.json")])
    assert args.plan == [(2048, 8, "ours_mlm"), (4096, 4, "ours_mlm"), (2048, 8, "hf_mlm_compiled")]
    assert args.seq_lens == [2048, 4096] and args.batch_sizes == [8, 4]
    for bad in (["--rows", "ours_mlm:4096"], ["--rows", "ours:4096x4"], ["--rows", "ours_mlm:16x1", "--seq-lens", "16"]):
        with pytest.raises(SystemExit):
            gpu_step_bench.parse_args(bad)

"""The fused kernel's self-check: ``auto`` checks the kernel before its first use on a kernel device, warns once
with the numbers and falls back to the reference path when it fails; ``triton`` raises instead.

CUDA is the only kernel device in production; here Triton's CPU interpreter stands in for it
(``KERNEL_DEVICE_TYPES`` gains "cpu"), so the real check runs the real kernel. Faults are injected at the kernel's
entry point (``attention._fused_attention``): a perturbed output, or an exception as a failed compile raises.
"""

from __future__ import annotations

import csv
import json
import logging
import os

import pytest
import torch

pytest.importorskip("triton", reason="the `triton` package is not installed (pip install -e '.[test]')")

from pretrain.model import attention  # noqa: E402
from pretrain.model.attention_check import (  # noqa: E402
    ELEMENT_FLOOR,
    ELEMENT_TOLERANCE,
    TOLERANCE,
    CheckKey,
    FusedAttentionCheckError,
    check_inputs,
    run_check,
)

HEAD_DIM = 16
REAL_KERNEL = attention._fused_attention

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="the kernel runs on CPU tensors here, through Triton's interpreter (TRITON_INTERPRET=1, set by conftest "
           "without a GPU); on a GPU, tests/test_attention_gpu.py checks the self-check on CUDA")


@pytest.fixture
def kernel_on_cpu(monkeypatch):
    """CPU tensors count as a kernel device (Triton's interpreter runs the kernel); no check cached before or after."""
    monkeypatch.setattr(attention, "KERNEL_DEVICE_TYPES", ("cuda", "cpu"))
    attention.clear_fused_attention_checks()
    yield
    attention.clear_fused_attention_checks()


def scaled_output(factor: float):
    """A kernel that computes everything 10% too large: forward and every gradient are off."""
    def kernel(*args):
        return REAL_KERNEL(*args) * factor
    return kernel


def failing_compile(*args):
    raise RuntimeError("PTX assembly aborted due to errors\nptxas fatal: unsupported instruction")


def core_args(dtype: torch.dtype, seed: int = 1):
    inputs = check_inputs(CheckKey("cpu", dtype, HEAD_DIM, True, True), length=24, seed=seed)
    return (inputs["q"], inputs["k"], inputs["v"], inputs["pos_key"], inputs["pos_query"], inputs["rel_index"],
            inputs["mask"], inputs["scale"], 0.0)


def check_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "self-check" in r.getMessage()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_healthy_kernel_passes_and_auto_runs_it(kernel_on_cpu, dtype, caplog):
    plan = attention.plan_attention("auto", "cpu", dtype, HEAD_DIM, True, True)
    assert plan["fused"] is True and plan["reason"] == "auto: self-check passed"
    check = plan["check"]
    assert check["passed"] and check["tolerance_max_rel"] == TOLERANCE[dtype]
    tensors = ["out", "grad_q", "grad_k", "grad_v", "grad_pos_key", "grad_pos_query"]
    # without and with dropout (the kernel's Philox mask applied to the reference), as training runs
    assert set(check["errors"]) == {*tensors, *(f"{t} (dropout 0.1)" for t in tensors)}
    assert all(0 < e["max_rel"] < TOLERANCE[dtype] / 5 for e in check["errors"].values())  # real numbers, margin
    assert all(0 < e["elem_rel"] < ELEMENT_TOLERANCE[dtype] / 5 for e in check["errors"].values())
    assert not check_warnings(caplog)
    args = core_args(dtype)
    assert torch.equal(attention.auto_attention(*args), REAL_KERNEL(*args))  # the kernel, not the reference
    assert len(attention.fused_attention_checks()) == 1  # one check per configuration, cached


def test_mismatch_warns_once_with_numbers_and_auto_falls_back(kernel_on_cpu, monkeypatch, caplog):
    monkeypatch.setattr(attention, "_fused_attention", scaled_output(1.1))
    args = core_args(torch.float32)
    with caplog.at_level(logging.WARNING, logger="pretrain.model.attention"):
        first = attention.auto_attention(*args)
        second = attention.auto_attention(*args)
        plan = attention.plan_attention("auto", "cpu", torch.float32, HEAD_DIM, True, True)
    (warning,) = check_warnings(caplog)  # one warning, however often the configuration is used
    assert "fused attention self-check (cpu float32 head_dim 16 c2p+p2c, B=2 N=2 L=24) FAILED" in warning
    assert "tolerance max_rel <= 0.0001" in warning
    assert "out max_abs=" in warning and "grad_pos_query max_abs=" in warning
    assert "uses the reference attention path for the rest of this run" in warning
    reference = attention.reference_attention(*args)
    assert torch.equal(first, reference) and torch.equal(second, reference)
    assert plan["fused"] is False and plan["reason"] == "auto: self-check failed, reference path"
    assert all(0.09 < e["max_rel"] < 0.11 for e in plan["check"]["errors"].values())  # the injected 10%

    with pytest.raises(FusedAttentionCheckError, match=r"FAILED: tolerance max_rel <= 0.0001, elem_rel <= 0.0001; "
                                                       r"out max_abs=\S+ max_rel=0.1"):
        attention.triton_attention(*args)
    with pytest.raises(FusedAttentionCheckError, match="does not fall back"):
        attention.plan_attention("triton", "cpu", torch.float32, HEAD_DIM, True, True)


def test_kernel_exception_is_a_failed_check(kernel_on_cpu, monkeypatch, caplog):
    monkeypatch.setattr(attention, "_fused_attention", failing_compile)
    args = core_args(torch.float16)
    with caplog.at_level(logging.WARNING, logger="pretrain.model.attention"):
        out = attention.auto_attention(*args)
    (warning,) = check_warnings(caplog)
    assert "(cpu float16 head_dim 16 c2p+p2c, B=2 N=2 L=24): the kernel raised RuntimeError: PTX assembly aborted" \
        in warning
    assert torch.equal(out, attention.reference_attention(*args))
    with pytest.raises(FusedAttentionCheckError, match="the kernel raised RuntimeError: PTX assembly aborted"):
        attention.triton_attention(*args)


def test_checks_are_per_configuration(kernel_on_cpu, monkeypatch):
    """A failure for c2p-only does not send c2p+p2c to the reference path, and the reverse."""
    plan = attention.plan_attention("auto", "cpu", torch.float32, HEAD_DIM, True, True)
    monkeypatch.setattr(attention, "_fused_attention", scaled_output(1.1))
    c2p_only = attention.plan_attention("auto", "cpu", torch.float32, HEAD_DIM, True, False)
    assert plan["fused"] is True and c2p_only["fused"] is False
    assert c2p_only["check"]["c2p"] is True and c2p_only["check"]["p2c"] is False
    assert "grad_pos_query" not in c2p_only["check"]["errors"]
    assert attention.plan_attention("auto", "cpu", torch.float32, HEAD_DIM, True, True)["fused"] is True  # cached


def test_no_check_where_auto_does_not_use_the_kernel(kernel_on_cpu, monkeypatch):
    monkeypatch.setattr(attention, "_fused_attention", failing_compile)
    assert attention.plan_attention("reference", "cpu", torch.float32, HEAD_DIM, True, True)["fused"] is False
    assert attention.plan_attention("auto", "mps", torch.float32, HEAD_DIM, True, True)["fused"] is False
    odd = attention.plan_attention("auto", "cpu", torch.float32, 24, True, True)
    assert odd["fused"] is False and "head size 24" in odd["reason"]
    assert attention.fused_attention_checks() == []
    with pytest.raises(ValueError, match="head size 24"):
        attention.plan_attention("triton", "cpu", torch.float32, 24, True, True)


def test_compiled_code_reads_the_planned_outcome(kernel_on_cpu, monkeypatch):
    """Planned before compilation, the outcome is a cached constant: fullgraph compilation has no graph break and
    computes what the eager backend computes, kernel or fallback."""
    args = core_args(torch.float32)
    attention.plan_attention("auto", "cpu", torch.float32, HEAD_DIM, True, True)
    torch._dynamo.reset()
    compiled = torch.compile(attention.auto_attention, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(*args), REAL_KERNEL(*args), atol=1e-6, rtol=0)

    attention.clear_fused_attention_checks()
    monkeypatch.setattr(attention, "_fused_attention", scaled_output(1.1))
    attention.plan_attention("auto", "cpu", torch.float32, HEAD_DIM, True, True)
    torch._dynamo.reset()
    compiled = torch.compile(attention.auto_attention, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(*args), attention.reference_attention(*args), atol=1e-6, rtol=0)


def test_first_use_inside_compiled_code_runs_the_check_eagerly(kernel_on_cpu, monkeypatch, caplog):
    """Not planned beforehand: dynamo breaks the graph at the check, which runs eagerly (real tensors, real kernel),
    and the compiled function then follows its outcome."""
    monkeypatch.setattr(attention, "_fused_attention", scaled_output(1.1))
    args = core_args(torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(attention.auto_attention, backend="eager")
    with caplog.at_level(logging.WARNING, logger="pretrain.model.attention"):
        out = compiled(*args)
    (check,) = attention.fused_attention_checks()
    assert not check.passed and all(0.09 < e["max_rel"] < 0.11 for e in check.errors.values())
    assert len(check_warnings(caplog)) == 1
    torch.testing.assert_close(out, attention.reference_attention(*args), atol=1e-6, rtol=0)


def test_attention_dtype_follows_lightning_precision():
    from pretrain.lightning_module import attention_dtype

    assert attention_dtype("bf16-mixed") == attention_dtype("bf16-true") == torch.bfloat16
    assert attention_dtype("16-mixed") == attention_dtype(16) == torch.float16
    assert attention_dtype("32-true") == attention_dtype("32") == torch.float32
    assert attention_dtype("64-true") == torch.float64


def test_training_run_records_the_fallback(shards, tmp_path, kernel_on_cpu, monkeypatch, caplog):
    """A run whose kernel fails its check: one warning, the reference path trains, attention_backend.json says
    why (with the numbers) and the metrics carry perf/attention_fused = 0."""
    from test_train import compose_config, tiny_run

    from pretrain.lightning_module import ATTENTION_RECORD
    from pretrain.train import train

    monkeypatch.setattr(attention, "_fused_attention", scaled_output(1.1))
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="pretrain.model.attention"):
        train(compose_config(tiny_run(shards, run, "mlm", 2, "export_hf=false")))
    (warning,) = check_warnings(caplog)
    assert "cpu float32 head_dim 16 c2p+p2c" in warning and "FAILED" in warning

    record = json.loads((run / ATTENTION_RECORD).read_text())
    assert record["backend"] == "auto" and record["device_type"] == "cpu" and record["dtype"] == "float32"
    assert record["fused"] == 0.0
    (plan,) = record["models"].values()
    assert plan["fused"] is False and plan["check"]["passed"] is False
    assert plan["check"]["errors"]["out"]["max_rel"] > plan["check"]["tolerance_max_rel"]
    assert "FAILED" in plan["check"]["summary"]
    assert not list(run.glob("*.tmp"))

    with open(run / "metrics.csv", newline="") as f:
        logged = [float(r["perf/attention_fused"]) for r in csv.DictReader(f) if r.get("perf/attention_fused")]
    assert logged and set(logged) == {0.0}


def test_elementwise_tolerance_catches_an_error_at_one_small_entry():
    """One output entry of small magnitude is off by half the relative-to-max tolerance: invisible to max_rel
    (errors are divided by the tensor's largest entry), caught by elem_rel (divided by the entry's own magnitude
    plus the floor). The fault sits where the reference is closest to zero among the real tokens' outputs."""
    key = CheckKey("cpu", torch.float32, HEAD_DIM, True, True)
    length = 20
    inputs = check_inputs(key, length)
    with torch.enable_grad():
        expected = attention.reference_attention(
            *(inputs[n].double() for n in ("q", "k", "v", "pos_key", "pos_query")), inputs["rel_index"],
            inputs["mask"], inputs["scale"], 0.0).detach()
    real = inputs["mask"][:, None, :, None].expand_as(expected)
    smallest = torch.where(real, expected.abs(), torch.inf).flatten().argmin()
    shift = 0.5 * TOLERANCE[torch.float32] * float(expected.abs().max())

    def one_wrong_entry(*args):
        out = REAL_KERNEL(*args)
        fault = torch.zeros(out.shape, dtype=out.dtype)
        fault.view(-1)[smallest] = shift
        return out + fault

    result = run_check(key, one_wrong_entry, attention.reference_attention, length=length)
    out = result.errors["out"]
    assert out["max_rel"] < TOLERANCE[torch.float32]  # the relative-to-max measure alone would pass this kernel
    assert out["elem_rel"] > ELEMENT_TOLERANCE[torch.float32]
    assert out["elem_rel"] > 0.5 * TOLERANCE[torch.float32] / (ELEMENT_FLOOR + 0.01)  # the shift, at its entry
    assert not result.passed
    assert all(e["elem_rel"] < ELEMENT_TOLERANCE[torch.float32] / 5 for n, e in result.errors.items() if n != "out")


def test_fp32_kernel_warns_that_it_is_a_test_mode(kernel_on_cpu, monkeypatch, caplog):
    """fp32 kernels use the smallest tiles and spill at head size 128: a run that would train with them is told."""
    # the check's outcome is not the subject here (the tests above run it): a passed one, without the interpreter
    monkeypatch.setattr(attention, "run_check", lambda key, *a, **k: attention.CheckResult(key, True, 1e-4))
    with caplog.at_level(logging.WARNING):
        plan = attention.plan_attention("auto", "cpu", torch.float32, HEAD_DIM, True, True)
        attention.plan_attention("auto", "cpu", torch.float16, HEAD_DIM, True, True)
    assert plan["fused"] is True
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [attention.FP32_KERNEL_WARNING]

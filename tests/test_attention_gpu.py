"""GPU only: the compiled Triton kernels in bf16, fp16 and fp32 against the reference path, in the same dtype and
in float64, outputs and every gradient, at v3-base-like shapes (head size 64 and 128, up to 512 tokens, padding,
log buckets); and the self-check of ``attention_backend=auto`` passing on CUDA.

Skipped on CPU: Triton's interpreter has no bf16 ``tl.dot``, and ``tests/test_triton_attention.py`` already covers
fp32/fp16 there. ``GPU_CHECK_DRY_RUN=1`` (what ``bash bench/gpu_check.sh --dry-run`` sets) runs tiny fp32/fp16
versions in the interpreter instead, so this file cannot rot between GPU sessions.

Errors are ``max |kernel - expected| / max |expected|`` per tensor. Tolerances (stated, by dtype): against float64,
3e-2 bf16, 5e-3 fp16, 2e-5 fp32, about ten times the rounding a correct kernel makes (bf16 keeps 8 significant
bits, fp16 11; fp32 uses IEEE dots); against the reference path in the same dtype, 5e-2 bf16, 1e-2 fp16, 2e-5
fp32, looser in 16 bits because that path rounds too (its probabilities and their gradient in the dtype), so the
two errors add up.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", reason="the `triton` package is not installed")

from pretrain.model import attention  # noqa: E402
from pretrain.model.attention_check import compare  # noqa: E402
from pretrain.model.relative_position import relative_position_index  # noqa: E402

CUDA = torch.cuda.is_available()
DRY_RUN = not CUDA and os.environ.get("GPU_CHECK_DRY_RUN") == "1" and os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if CUDA else "cpu"

pytestmark = pytest.mark.skipif(
    not (CUDA or DRY_RUN),
    reason="GPU only: compiled kernels in bf16/fp16/fp32 against float64 (no CUDA device here; the CPU interpreter "
           "has no bf16 tl.dot; GPU_CHECK_DRY_RUN=1 with TRITON_INTERPRET=1 runs tiny fp32/fp16 versions)")



@pytest.fixture(autouse=True)
def _nan_filled_outputs(monkeypatch):
    """Every buffer the kernels should write starts as NaN (``DEBERTA_ATTENTION_DEBUG_FILL``): a missed store fails."""
    monkeypatch.setenv("DEBERTA_ATTENTION_DEBUG_FILL", "1")


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOL_VS_FP64 = {"bf16": 3e-2, "fp16": 5e-3, "fp32": 2e-5}
TOL_VS_SAME_DTYPE = {"bf16": 5e-2, "fp16": 1e-2, "fp32": 2e-5}

# (dtype, batch, heads, length, head_dim): v3-base heads at 512 tokens (multiples of 16 share compiled variants with
# the self-check and the benchmarks); L=200, a multiple of no pinned tile (16 to 64), for every pinned configuration
# (each dtype at head size 64 and 128), so every kernel meets partial tiles; one case at L=2048.
GPU_CASES = {
    "bf16_d64_L512": ("bf16", 4, 12, 512, 64),
    "bf16_d128_L144": ("bf16", 2, 8, 144, 128),
    "fp16_d64_L512": ("fp16", 4, 12, 512, 64),
    "fp32_d64_L512": ("fp32", 2, 12, 512, 64),
    **{f"{dtype}_d{d}_L200": (dtype, 3, 4, 200, d) for dtype in ("bf16", "fp16", "fp32") for d in (64, 128)},
    "bf16_d64_L2048": ("bf16", 1, 4, 2048, 64),
}
DRY_RUN_CASES = {"fp32_d16_L40": ("fp32", 3, 2, 40, 16), "fp16_d16_L40": ("fp16", 3, 2, 40, 16)}
CASES = GPU_CASES if CUDA else DRY_RUN_CASES
SPAN, BUCKETS, MAX_POSITION = 256, 256, 512  # v3-base: 512 table rows, log buckets beyond distance 128
if not CUDA:
    SPAN, BUCKETS, MAX_POSITION = 8, 8, 16


def make_inputs(batch, heads, length, head_dim, seed=0):
    """Leaves in float64 (rounded through the tested dtype by the caller), padding in two sequences."""
    g = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[-1, length // 2:] = False  # half padding
    mask[0, length - 5:] = False  # a few padded positions at the end,
    mask[0, :3] = False  # at the start
    mask[0, length // 3:length // 3 + 2] = False  # and inside
    if batch >= 3:
        mask[1] = False  # a sequence of padding only: every row fully masked
    return {"q": draw(batch, heads, length, head_dim), "k": draw(batch, heads, length, head_dim),
            "v": draw(batch, heads, length, head_dim), "pos_key": draw(heads, 2 * SPAN, head_dim),
            "pos_query": draw(heads, 2 * SPAN, head_dim), "grad_out": draw(batch, heads, length, head_dim),
            "mask": mask.to(DEVICE),
            "rel_index": relative_position_index(length, length, SPAN, BUCKETS, MAX_POSITION, device=DEVICE)}


def run(core, inputs, dtype, rounded_through):
    """Forward and backward of ``core`` on the inputs rounded to ``rounded_through`` and computed in ``dtype``:
    the output and gradients in float64."""
    names = ("q", "k", "v", "pos_key", "pos_query")
    leaves = {n: inputs[n].to(rounded_through).to(DEVICE, dtype).requires_grad_() for n in names}
    scale = 1.0 / (3 * inputs["q"].shape[-1]) ** 0.5
    out = core(*(leaves[n] for n in names), inputs["rel_index"], inputs["mask"], scale, 0.0)
    out.backward(inputs["grad_out"].to(rounded_through).to(DEVICE, dtype))
    return {"out": out.detach().double(), **{f"grad_{n}": leaves[n].grad.double() for n in names}}


def worst(errors):
    return max(errors.items(), key=lambda item: item[1]["max_rel"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_float64_and_same_dtype_reference(case):
    name, batch, heads, length, head_dim = CASES[case]
    dtype = DTYPES[name]
    inputs = make_inputs(batch, heads, length, head_dim)
    kernel = run(attention.triton_attention, inputs, dtype, dtype)
    exact = run(attention.reference_attention, inputs, torch.float64, dtype)  # same rounded inputs, float64
    same_dtype = run(attention.reference_attention, inputs, dtype, dtype)
    vs_fp64, vs_same = compare(kernel, exact), compare(kernel, same_dtype)
    report = {n: f"{vs_fp64[n]['max_rel']:.2e} (vs {name} reference {vs_same[n]['max_rel']:.2e})" for n in vs_fp64}
    print(f"{case}: max_rel vs float64 {report}")
    assert set(vs_fp64) == {"out", "grad_q", "grad_k", "grad_v", "grad_pos_key", "grad_pos_query"}
    tensor, err = worst(vs_fp64)
    assert err["max_rel"] <= TOL_VS_FP64[name], f"{case}: {tensor} off float64 by {err} (tolerance {TOL_VS_FP64[name]})"
    tensor, err = worst(vs_same)
    assert err["max_rel"] <= TOL_VS_SAME_DTYPE[name], \
        f"{case}: {tensor} off the {name} reference path by {err} (tolerance {TOL_VS_SAME_DTYPE[name]})"
    for n, t in kernel.items():
        assert torch.isfinite(t).all(), f"{case}: non-finite {n}"


@pytest.mark.parametrize("dtype_name", ["bf16", "fp16", "fp32"] if CUDA else ["fp32", "fp16"])
def test_auto_self_check_passes(dtype_name, monkeypatch):
    """The check ``auto`` runs before first use passes on this card for the training dtypes (no fallback)."""
    monkeypatch.setattr(attention, "KERNEL_DEVICE_TYPES", ("cuda",) if CUDA else ("cuda", "cpu"))
    attention.clear_fused_attention_checks()
    head_dim = 64 if CUDA else 16
    plan = attention.plan_attention("auto", DEVICE, DTYPES[dtype_name], head_dim, True, True)
    print(plan["check"]["summary"])
    assert plan["fused"] is True, plan["check"]["summary"]
    attention.clear_fused_attention_checks()


DROPOUT_CASES = ({f"{dtype}_d{d}_L200": (dtype, d, 200) for dtype in ("bf16", "fp16", "fp32") for d in (64, 128)}
                 if CUDA else {"fp32_d16_L24": ("fp32", 16, 24)})


@pytest.mark.parametrize("case", sorted(DROPOUT_CASES))
def test_dropout_variants_match_the_reference_given_the_kernels_mask(case):
    """Training runs with attention dropout (its own compiled variants): forward and backward regenerate the same
    Philox mask, and with that mask applied the reference agrees, within the self-check's tolerances (max_rel and
    elementwise), with partial tiles and every kind of padding."""
    from pretrain.model.attention_check import CheckKey, Dropout, run_check

    name, head_dim, length = DROPOUT_CASES[case]
    key = CheckKey(DEVICE, DTYPES[name], head_dim, True, True)
    result = run_check(key, attention._fused_attention, attention.reference_attention, length=length,
                       dropout=Dropout(attention._fused_dropout_mask, attention._reference_given_mask))
    print(result.describe())
    assert result.passed, result.describe()
    assert any("(dropout" in tensor for tensor in result.errors)

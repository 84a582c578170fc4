"""Self-check of the fused attention kernel against the reference path, run once per configuration.

Why: the fused kernel is the default on CUDA, but a Triton/driver/card combination it has never met can compile it
wrongly (or not at all), and a wrong attention trains silently into a worse model. Before the first use, the kernel
and :func:`~pretrain.model.attention.reference_attention` compute the same small problem, forward and backward,
in the run's dtype, with the run's head size and position terms, padding and log buckets; the reference computes
in float64 from the very same (rounded) inputs, so the comparison measures the kernel's error alone.

The error of each tensor (output, gradients of q, k, v, pos_key, pos_query) is measured twice:

- ``max_rel``: ``max |kernel - reference|`` (``max_abs``) over ``max |reference|``, scale-free;
- ``elem_rel``: ``max |kernel - reference| / (|reference| + floor)`` elementwise, each element against its own
  magnitude, with an absolute floor of :data:`ELEMENT_FLOOR` x ``max |reference|`` (rounding makes small entries'
  relative errors meaningless below it). Errors confined to small entries (far-position gradient rows, tile
  edges) hide in ``max_rel`` and show here.

The check passes when both are finite and within the dtype's tolerances (:data:`TOLERANCE`,
:data:`ELEMENT_TOLERANCE`). Both sit about ten times above the rounding a correct kernel makes (measured in fp32 and
fp16; bf16 keeps 8 significant bits, fp16 11, hence bf16's larger bound) and far below what a wrong table row, mask
or gradient gives (errors of order one). The kernel's outputs start as NaN (``DEBERTA_ATTENTION_DEBUG_FILL``) during
the check, so an entry it fails to write cannot pass, and the check runs with and without dropout (the kernel's own
Philox mask, applied to the reference), since training compiles the dropout variants.

This module only measures; the policy (warn and fall back, or raise) and the cache live in
:mod:`pretrain.model.attention`, which passes the two cores in, so there is no import cycle.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch

from pretrain.model.relative_position import relative_position_index

# max |kernel - reference| / max |reference| allowed per tensor, by the dtype the kernel computes in.
TOLERANCE: dict[torch.dtype, float] = {torch.bfloat16: 5e-2, torch.float16: 1e-2, torch.float32: 1e-4}
# max |kernel - reference| / (|reference| + ELEMENT_FLOOR x max |reference|) allowed per tensor. Measured on a correct
# kernel (interpreter, L=24, d=16): about 2e-6 in fp32 and 4e-3 in fp16.
ELEMENT_FLOOR = 0.05
ELEMENT_TOLERANCE: dict[torch.dtype, float] = {torch.bfloat16: 2.5e-1, torch.float16: 5e-2, torch.float32: 1e-4}
TENSORS = ("out", "grad_q", "grad_k", "grad_v", "grad_pos_key", "grad_pos_query")

# The check's problem: 2 sequences (the second half padding), 2 heads, log buckets beyond max_position. On a GPU the
# length spans two 128-row tiles and is a multiple of 16 (the kernels then share the run's compiled variant); in
# Triton's CPU interpreter a shorter one keeps it to seconds.
BATCH, HEADS = 2, 2
GPU_LENGTH, INTERPRETER_LENGTH = 144, 24
DROPOUT_P, DROPOUT_SEED = 0.1, 1234  # the second pass: pretraining's attention dropout
SPAN, BUCKETS, MAX_POSITION = 16, 16, 64


class CheckKey(NamedTuple):
    """What a compiled kernel variant depends on: one check covers every call with the same key."""

    device_type: str
    dtype: torch.dtype
    head_dim: int
    has_c2p: bool
    has_p2c: bool

    def label(self) -> str:
        terms = "+".join(t for t, on in (("c2p", self.has_c2p), ("p2c", self.has_p2c)) if on) or "no position terms"
        return f"{self.device_type} {str(self.dtype).removeprefix('torch.')} head_dim {self.head_dim} {terms}"


class FusedAttentionCheckError(RuntimeError):
    """The fused kernel failed its self-check (attention_backend=triton, which must not fall back)."""


@dataclass
class CheckResult:
    key: CheckKey
    passed: bool
    tolerance: float
    element_tolerance: float = math.inf
    errors: dict[str, dict[str, float]] = field(default_factory=dict)  # tensor -> {"max_abs", "max_rel", "elem_rel"}
    exception: str | None = None  # the kernel raised (e.g. a compile error) instead of computing
    seconds: float = 0.0
    shape: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        """One line with every number: what the warning and the error say."""
        head = f"fused attention self-check ({self.key.label()}, {self.shape_text()})"
        if self.exception is not None:
            return f"{head}: the kernel raised {self.exception}"
        errors = ", ".join(f"{name} max_abs={e['max_abs']:.3g} max_rel={e['max_rel']:.3g} "
                           f"elem_rel={e.get('elem_rel', math.nan):.3g}" for name, e in self.errors.items())
        verdict = "passed" if self.passed else "FAILED"
        return (f"{head} {verdict}: tolerance max_rel <= {self.tolerance:g}, elem_rel <= {self.element_tolerance:g}"
                f"; {errors}")

    def shape_text(self) -> str:
        s = self.shape
        return f"B={s.get('batch')} N={s.get('heads')} L={s.get('length')}" if s else "no input"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (run directory record, benchmark reports)."""
        return {"device_type": self.key.device_type, "dtype": str(self.key.dtype).removeprefix("torch."),
                "head_dim": self.key.head_dim, "c2p": self.key.has_c2p, "p2c": self.key.has_p2c,
                "passed": self.passed, "tolerance_max_rel": self.tolerance,
                "tolerance_elem_rel": self.element_tolerance, "elem_floor": ELEMENT_FLOOR,
                "errors": {n: {k: _finite_or_none(v) for k, v in e.items()} for n, e in self.errors.items()},
                "exception": self.exception, "seconds": round(self.seconds, 3), "shape": self.shape,
                "summary": self.describe()}


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN


def check_length(device_type: str) -> int:
    """Tokens per sequence of the check's problem (short in Triton's slow CPU interpreter)."""
    interpreting = os.environ.get("TRITON_INTERPRET") == "1" and device_type != "cuda"
    return INTERPRETER_LENGTH if interpreting else GPU_LENGTH


def check_inputs(key: CheckKey, length: int, seed: int = 0) -> dict[str, Any]:
    """The problem, drawn from a private generator (the run's random streams are not touched)."""
    g = torch.Generator().manual_seed(seed)
    device = torch.device(key.device_type)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, key.dtype)

    shape = (BATCH, HEADS, length, key.head_dim)
    mask = torch.ones(BATCH, length, dtype=torch.bool)
    mask[0, :3] = False  # leading,
    mask[0, length // 2:length // 2 + 2] = False  # interior
    mask[0, -2:] = False  # and trailing padding;
    mask[-1] = False  # the last sequence is all padding (every row fully masked: a uniform softmax, as HF)
    return {
        "q": draw(*shape), "k": draw(*shape), "v": draw(*shape),
        "pos_key": draw(HEADS, 2 * SPAN, key.head_dim) if key.has_c2p else None,
        "pos_query": draw(HEADS, 2 * SPAN, key.head_dim) if key.has_p2c else None,
        "rel_index": relative_position_index(length, length, SPAN, BUCKETS, MAX_POSITION, device=device),
        "mask": mask.to(device), "grad_out": draw(*shape), "scale": 1.0 / math.sqrt(3 * key.head_dim),
    }


def _output_and_grads(core: Callable, inputs: dict[str, Any], dtype: torch.dtype, dropout_p: float = 0.0
                      ) -> dict[str, torch.Tensor]:
    """Run ``core`` forward and backward on fresh leaves of ``inputs`` cast to ``dtype``; float64 results."""
    names = ("q", "k", "v", "pos_key", "pos_query")
    leaves = {n: inputs[n].detach().to(dtype).requires_grad_() for n in names if inputs[n] is not None}
    out = core(leaves["q"], leaves["k"], leaves["v"], leaves.get("pos_key"), leaves.get("pos_query"),
               inputs["rel_index"], inputs["mask"], inputs["scale"], dropout_p)
    out.backward(inputs["grad_out"].to(out.dtype))
    results = {"out": out.detach().double()}
    for n, leaf in leaves.items():
        results[f"grad_{n}"] = leaf.grad.double() if leaf.grad is not None else torch.full_like(leaf, math.nan,
                                                                                                dtype=torch.float64)
    return results


def compare(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per tensor: max |got - expected|, that over max |expected|, and the largest elementwise error relative to
    the element's own magnitude with the floor :data:`ELEMENT_FLOOR` x max |expected| (NaN anywhere gives NaN)."""
    errors = {}
    for name in TENSORS:
        if name not in expected:
            continue
        delta = (got[name] - expected[name]).abs()
        magnitude = expected[name].abs()
        scale = float(magnitude.max())
        diff = float(delta.max()) if not delta.isnan().any() else math.nan
        floor = ELEMENT_FLOOR * scale if scale > 0 else 1.0
        elem = float((delta / (magnitude + floor)).max()) if not math.isnan(diff) else math.nan
        errors[name] = {"max_abs": diff, "max_rel": diff / scale if scale > 0 else diff, "elem_rel": elem}
    return errors


def within(errors: dict[str, dict[str, float]], tolerance: float, element_tolerance: float) -> bool:
    """Every tensor's errors finite and within both tolerances."""
    return all(math.isfinite(e["max_rel"]) and e["max_rel"] <= tolerance and
               math.isfinite(e.get("elem_rel", 0.0)) and e.get("elem_rel", 0.0) <= element_tolerance
               for e in errors.values())


@contextlib.contextmanager
def _nan_filled_outputs():
    """``DEBERTA_ATTENTION_DEBUG_FILL=1`` for the duration: every buffer the kernel should write starts as NaN."""
    before = os.environ.get("DEBERTA_ATTENTION_DEBUG_FILL")
    os.environ["DEBERTA_ATTENTION_DEBUG_FILL"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("DEBERTA_ATTENTION_DEBUG_FILL", None)
        else:
            os.environ["DEBERTA_ATTENTION_DEBUG_FILL"] = before


def _with_dropout(kernel: Callable, dropout: Dropout, inputs: dict[str, Any], key: CheckKey
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The kernel with dropout, and the float64 reference given the very mask the kernel drew. Both draws come
    from a private seed of torch's generator, whose state is restored afterwards (the run's streams untouched)."""
    q = inputs["q"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DROPOUT_SEED)
        keep = dropout.keep_mask(q.shape[0], q.shape[1], q.shape[2], DROPOUT_P, q.device)
        torch.manual_seed(DROPOUT_SEED)
        got = _output_and_grads(kernel, inputs, key.dtype, DROPOUT_P)
    expected = _output_and_grads(dropout.reference_given(keep), inputs, torch.float64, DROPOUT_P)
    return got, expected


class Dropout(NamedTuple):
    """How to check the dropout variants: ``keep_mask(batch, heads, length, p, device)`` gives the mask the
    kernel's next call draws (same generator state), ``reference_given(keep)`` the reference core with that mask."""

    keep_mask: Callable
    reference_given: Callable


def run_check(key: CheckKey, kernel: Callable, reference: Callable, length: int | None = None,
              dropout: Dropout | None = None) -> CheckResult:
    """Compare ``kernel`` (in ``key.dtype``) with ``reference`` (float64, same inputs), without and (given
    ``dropout``) with dropout; never raises for a kernel failure, which is part of the result.

    Runs eagerly with gradients on and autocast off, whatever the caller's context (a validation step under
    ``no_grad``, a bf16 autocast region), because the kernel must see exactly the dtype being checked.
    """
    length = length or check_length(key.device_type)
    tolerance = TOLERANCE.get(key.dtype, TOLERANCE[torch.float32])
    element_tolerance = ELEMENT_TOLERANCE.get(key.dtype, ELEMENT_TOLERANCE[torch.float32])
    result = CheckResult(key, passed=False, tolerance=tolerance, element_tolerance=element_tolerance,
                         shape={"batch": BATCH, "heads": HEADS, "length": length})
    start = time.perf_counter()
    inputs = check_inputs(key, length)
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(key.device_type, enabled=False), \
            _nan_filled_outputs():
        expected = _output_and_grads(reference, inputs, torch.float64)
        try:
            got = _output_and_grads(kernel, inputs, key.dtype)
            errors = compare(got, expected)
            if dropout is not None:
                got, expected = _with_dropout(kernel, dropout, inputs, key)
                errors.update({f"{name} (dropout {DROPOUT_P:g})": e for name, e in compare(got, expected).items()})
            if key.device_type == "cuda":
                torch.cuda.synchronize()  # an asynchronous launch failure belongs to the kernel, not to later code
        except Exception as err:  # a compile error, an unsupported instruction, a launch failure
            result.exception = f"{type(err).__name__}: {_first_line(err)}"
        else:
            result.errors = errors
            result.passed = within(errors, tolerance, element_tolerance)
    result.seconds = time.perf_counter() - start
    return result


def _first_line(err: BaseException) -> str:
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return text[:500]

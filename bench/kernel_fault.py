"""A deliberate fault in the fused attention kernel, for testing what the GPU check reports when the kernel is wrong.

``GPU_CHECK_INJECT_FAULT=1`` adds 1.0 to one element of every fused-kernel output in this process (the self-check
stage and the step benchmark both call :func:`inject_if_requested`). The self-check must then fail, ``auto`` falls
back to the reference path, and the step rows of ours must come out ``invalid``, not as our speed: the dry-run
test of ``bench/gpu_check.sh`` shows exactly that. Unset (always, outside that test), this module does nothing.
"""

from __future__ import annotations

import os

import torch

ENV = "GPU_CHECK_INJECT_FAULT"


def inject_if_requested() -> bool:
    """Wrap the fused kernel with the fault when ``GPU_CHECK_INJECT_FAULT=1``; True when it did."""
    if os.environ.get(ENV) != "1":
        return False
    from pretrain.model import attention

    kernel = attention._fused_attention

    def faulty(*args):
        out = kernel(*args)
        fault = torch.zeros(out.shape, dtype=out.dtype, device=out.device)
        fault.view(-1)[0] = 1.0
        return out + fault

    attention._fused_attention = faulty
    print(f"{ENV}=1: the fused attention kernel's output is deliberately wrong in this process", flush=True)
    return True

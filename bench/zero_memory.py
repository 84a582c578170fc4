"""Per-GPU memory for model states (weights + gradients + AdamW state) under DDP and DeepSpeed ZeRO-1/2/3.

Parameter counts come from the native model as training builds it (``objectives.build.build_objective``: for v3 the
discriminator, the half-depth generator and the GDES residual table; for v2 the MLM model with its EMD), created
on the meta device, so nothing is allocated. ZeRO-2 and ZeRO-3 figures are DeepSpeed's own estimators
(``estimate_zero2_model_states_mem_needs``, ``estimate_zero3_model_states_mem_needs``, no offload); ZeRO-1 and
DDP have no DeepSpeed estimator and use the same byte accounting, stated in ``BYTES``. Activations are not
included (they are the same under every strategy; see the README).

Usage: ``python bench/zero_memory.py [--gpus 8] [--models v3_base v3_large]`` (prints a Markdown table)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from pretrain.model import DebertaConfig
from pretrain.objectives.base import SpecialTokens
from pretrain.settings import ObjectiveSettings
from pretrain.objectives.build import build_objective

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3
BYTES = {
    # Lightning bf16-mixed DDP keeps fp32 weights: 4 (weights) + 4 (grads) + 8 (AdamW m, v) per parameter.
    "DDP": "16 P",
    # DeepSpeed bf16: 2 (16-bit weights) + 2 (16-bit grads) replicated; 4 (fp32 grads) + 4 (fp32 master weights)
    # + 8 (m, v) partitioned over N ranks -- the accounting of DeepSpeed's ZeRO-2 estimator with grads replicated.
    "ZeRO-1": "4 P + 16 P / N",
    "ZeRO-2": "2 P + 18 P / N (DeepSpeed estimator)",
    "ZeRO-3": "4 L + 18 P / N (DeepSpeed estimator; L = largest layer)",
}


def objective_on_meta(model: str, objective: str):
    raw = yaml.safe_load((REPO / "conf" / "model" / f"{model}.yaml").read_text())
    raw["vocab_size"] = raw.get("vocab_size") or DebertaConfig.vocab_size  # null (follow the tokenizer): 128100
    with torch.device("meta"):
        return build_objective(DebertaConfig(**raw), ObjectiveSettings(name=objective), SpecialTokens(0, 1, 2, 3, 4))


def counts(module: torch.nn.Module) -> tuple[int, int]:
    """Total trainable parameters, and the largest number held directly by one module (ZeRO-3 gathers that
    much at once), as DeepSpeed's ``estimate_zero3_model_states_mem_needs_all_live`` counts them."""
    total = sum(p.numel() for p in module.parameters() if p.requires_grad)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules())
    return total, largest


def per_gpu_bytes(total: int, largest: int, gpus: int) -> dict[str, int]:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    _, zero2 = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=gpus, num_nodes=1, cpu_offload=False)
    _, zero3, _ = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=gpus, num_nodes=1,
                                                        cpu_offload=False, cpu_offload_params=False)
    return {"DDP": 16 * total, "ZeRO-1": 4 * total + 16 * total // gpus, "ZeRO-2": zero2, "ZeRO-3": zero3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--models", nargs="+", default=["v3_base", "v3_large"])
    args = parser.parse_args()
    header = ["model (objective)", "trained parameters", *[f"{k} GiB/GPU" for k in BYTES]]
    print(f"Model states per GPU, {args.gpus} GPUs, AdamW, bf16 mixed precision (activations not included)\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name in args.models:
        objective = "rtd" if name.startswith("v3") else "mlm"
        total, largest = counts(objective_on_meta(name, objective))
        row = per_gpu_bytes(total, largest, args.gpus)
        print(f"| {name} ({objective}) | {total / 1e6:.1f} M | " + " | ".join(f"{row[k] / GIB:.2f}" for k in BYTES) + " |")
    print("\nBytes per parameter (P parameters, N GPUs): " + "; ".join(f"{k}: {v}" for k, v in BYTES.items()))


if __name__ == "__main__":
    main()

"""``data.global_batch_size``: the accumulation that keeps the global batch fixed whatever the number of ranks.

Why: the global batch (sequences per optimizer step) is what the learning-rate schedule and the published recipes
are stated in. Written as ``data.batch_size x ranks x trainer.accumulate_grad_batches`` it silently changes when a
job moves from 8 to 16 GPUs or a requeued job lands on fewer nodes. With ``data.global_batch_size`` the accumulation
is derived at start-up from the ranks the job actually has; a global batch the ranks cannot divide is an error that
lists the choices that work. A resume with another accumulation is re-aligned by
``pretrain.checkpointing.callbacks.RunCheckpoint``.
"""

from __future__ import annotations

from pretrain.settings import SettingsError


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(n ** 0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def accumulation_for(global_batch: int, micro_batch: int, ranks: int) -> int:
    """``trainer.accumulate_grad_batches`` for ``global_batch`` sequences per step with ``micro_batch`` sequences
    per rank and ``ranks`` data-parallel ranks; a SettingsError listing valid choices when it does not divide."""
    per_pass = micro_batch * ranks
    if global_batch % per_pass == 0:
        return global_batch // per_pass
    lines = [f"data.global_batch_size={global_batch} is not a multiple of data.batch_size={micro_batch} x "
             f"{ranks} data-parallel rank(s) = {per_pass}, so no whole trainer.accumulate_grad_batches gives it."]
    if global_batch % ranks == 0:
        sizes = [d for d in _divisors(global_batch // ranks) if d <= 4 * micro_batch][-8:]
        lines.append(f"With {ranks} rank(s), data.batch_size can be one of {', '.join(map(str, sizes))} "
                     f"(accumulation {', '.join(str(global_batch // (ranks * d)) for d in sizes)}).")
    else:
        lines.append(f"{ranks} rank(s) cannot share {global_batch} sequences evenly.")
    if global_batch % micro_batch == 0:
        counts = [d for d in _divisors(global_batch // micro_batch) if d <= max(4 * ranks, 8)]
        lines.append(f"With data.batch_size={micro_batch}, the number of ranks can be one of "
                     f"{', '.join(map(str, counts))}.")
    lines.append("Or change data.global_batch_size (every run of one output_dir keeps the same global batch).")
    raise SettingsError(" ".join(lines))

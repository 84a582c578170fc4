"""The pretraining LR schedule, and what it does when a resumed run's ``trainer.max_steps`` differs from the one it
was built for.

The schedule is linear warm-up, then linear decay to ``optim.min_lr_ratio`` at ``trainer.max_steps``. Its multiplier
is a callable object, so torch's ``LambdaLR`` saves its state (the total it decays to) in every checkpoint; a
function would not be saved, and a resume with a larger ``max_steps`` used to run its first step at the LR the old
schedule had left in the optimizer (0.0 once a run had finished) and then jump up onto the new total's curve.

Now a resume compares the saved total with ``trainer.max_steps`` and, when they differ, says so once
(:func:`extension_note`) and continues (:func:`follow_max_steps`) from the LR of the last trained step, as
``optim.on_extend`` asks:

- ``stretch`` (default): the remaining decay is stretched to the new end, from that LR down to
  ``min_lr_ratio x lr`` at the new ``max_steps``;
- ``constant``: that LR is kept for every remaining step.

A resume whose ``max_steps`` is unchanged computes exactly what the uninterrupted run computes.
"""

from __future__ import annotations

import torch

ON_EXTEND = ("stretch", "constant")


def linear_warmup_decay(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: 0 -> 1 over ``warmup_steps``, then linearly to ``min_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    remaining = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / remaining)
    return max(min_ratio, 1.0 - progress * (1.0 - min_ratio))


class WarmupDecay:
    """LR multiplier of optimizer step ``step`` (0-based). Its attributes are saved with the scheduler's state.

    ``anchor_step``/``anchor_ratio`` are set when ``total_steps`` changed on a resume: after warm-up the multiplier
    then goes linearly from ``anchor_ratio`` at ``anchor_step`` (the last step trained before the change) to
    ``min_ratio`` at ``total_steps``, or stays at ``anchor_ratio`` when ``hold``."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float):
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_ratio = min_ratio
        self.anchor_step: int | None = None
        self.anchor_ratio: float | None = None
        self.hold = False

    def __call__(self, step: int) -> float:
        if self.anchor_step is None or step < self.warmup_steps:
            return linear_warmup_decay(step, self.warmup_steps, self.total_steps, self.min_ratio)
        if self.hold:
            return self.anchor_ratio
        progress = min(1.0, max(0, step - self.anchor_step) / max(1, self.total_steps - self.anchor_step))
        return self.anchor_ratio + progress * (self.min_ratio - self.anchor_ratio)

    def rebase(self, completed: int, total_steps: int, on_extend: str) -> None:
        """Continue after ``completed`` optimizer steps towards ``total_steps`` instead (see the module text)."""
        last = completed - 1
        if last < self.warmup_steps - 1:  # still warming up: warm-up ends where it would have
            if on_extend == "constant":
                self.anchor_step, self.anchor_ratio, self.hold = self.warmup_steps - 1, 1.0, True
        else:
            self.anchor_step, self.anchor_ratio, self.hold = last, self(last), on_extend == "constant"
        self.total_steps = total_steps


def build_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                   min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupDecay(warmup_steps, total_steps, min_ratio))


def follow_max_steps(scheduler: torch.optim.lr_scheduler.LRScheduler, max_steps: int, on_extend: str,
                     recorded: bool = True) -> bool:
    """Once a resume has restored ``scheduler``: if its schedule decays to another total than ``max_steps``, rebase
    it and set the optimizer's LR for the next step. ``recorded``: False for a checkpoint written before the
    schedule's total was saved with it (the LR then follows ``max_steps`` from the next step). True if anything
    changed."""
    lambdas = getattr(scheduler, "lr_lambdas", None) or []
    schedules = list({id(f): f for f in lambdas if isinstance(f, WarmupDecay)}.values())
    completed = scheduler.last_epoch
    if not schedules or completed <= 0:
        return False
    rebased = schedules[0].total_steps != max_steps
    if rebased:
        for schedule in schedules:
            schedule.rebase(completed, max_steps, on_extend)
    elif recorded:
        return False
    lrs = [base * f(completed) for base, f in zip(scheduler.base_lrs, lambdas)]
    if all(group["lr"] == lr for group, lr in zip(scheduler.optimizer.param_groups, lrs)):
        return rebased
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
    return True


def extension_note(state: dict, warmup_steps: int, max_steps: int, on_extend: str, min_lr_ratio: float) -> str | None:
    """The one warning for a resume whose ``trainer.max_steps`` differs from the one the saved schedule
    (``state``: the scheduler's state in the checkpoint) was built for; None when nothing changes. Worked out from
    the checkpoint alone, so it is said before the progress bar is drawn."""
    completed, base = int(state.get("last_epoch", 0)), float((state.get("base_lrs") or [0.0])[0])
    saved = next((d for d in state.get("lr_lambdas") or [] if isinstance(d, dict)), None)
    if completed <= 0:
        return None
    if saved is None:  # a checkpoint from before the schedule saved its total
        expected = base * linear_warmup_decay(completed, warmup_steps, max_steps, min_lr_ratio)
        if (state.get("_last_lr") or [expected])[0] == expected:
            return None
        return (f"the checkpoint (step {completed}) does not record the trainer.max_steps its LR schedule was built "
                f"for (it predates that record); the LR now follows the schedule to step {max_steps}: "
                f"{expected:.3g} at the next step")
    schedule = WarmupDecay.__new__(WarmupDecay)
    schedule.__dict__.update(saved)
    old_total = schedule.total_steps
    if old_total == max_steps:
        return None
    before = base * schedule(completed - 1)
    warming_up = completed < schedule.warmup_steps
    grew = "grew" if max_steps > old_total else "shrank"
    peak, end = base, base * min_lr_ratio
    warmup = schedule.warmup_steps
    if warming_up and on_extend == "constant":
        what = (f"warm-up ends at step {warmup} as planned, then the LR stays at {peak:.3g} (optim.on_extend=constant; "
                f"optim.on_extend=stretch would decay it to {end:.3g} at step {max_steps})")
    elif warming_up:
        what = (f"warm-up ends at step {warmup} as planned, then the LR decays to {end:.3g} at step {max_steps} "
                "(optim.on_extend=stretch, the default; optim.on_extend=constant would keep it after warm-up)")
    elif on_extend == "constant":
        what = (f"the LR stays at {before:.3g} (its value at step {completed}) for the remaining steps "
                f"(optim.on_extend=constant; optim.on_extend=stretch would decay it to {end:.3g} at step {max_steps})")
    else:
        what = (f"the LR decays on from {before:.3g} (its value at step {completed}) to {end:.3g} at step "
                f"{max_steps} (optim.on_extend=stretch, the default; optim.on_extend=constant keeps it at "
                f"{before:.3g})")
    return f"trainer.max_steps {grew} from {old_total} to {max_steps} since the checkpoint (step {completed}): {what}"

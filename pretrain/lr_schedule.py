"""The pretraining LR schedules, and what they do when a resumed run's plan (``trainer.max_steps``, the WSD decay
length) differs from the one it was built for.

``optim.schedule`` picks the curve of the LR multiplier ``f(s)`` of optimizer step ``s`` (0-based; the LR of the step
is ``f(s) x optim.lr``). With ``W = optim.warmup_steps``, ``T = trainer.max_steps``, ``m = optim.min_lr_ratio``:

- every schedule warms up linearly: ``f(s) = (s + 1) / W`` for ``s < W``;
- ``linear`` (default, DeBERTa's ``warmup_linear``): ``f(s) = max(m, 1 - p (1 - m))`` with ``p = min(1, (s - W) / (T - W))``;
- ``cosine``: ``f(s) = m + (1 - m) (1 + cos(pi p)) / 2``, the same ``p``;
- ``wsd`` (warmup-stable-decay; ModernBERT, Hägele et al. 2024 "Scaling Laws and Compute-Optimal Training Beyond
  Fixed Training Durations"): with ``D`` decay steps (``optim.decay_steps``, or ``round(optim.decay_fraction x T)``)
  the decay starts at ``S = T - D``: ``f(s) = 1`` for ``W <= s < S``, then ``f(s) = m + (1 - m) g(q)`` with
  ``q = (s - S) / D`` and ``g(q) = 1 - sqrt(q)`` (``optim.decay_shape=1-sqrt``) or ``1 - q`` (``linear``).

Each curve reaches ``m`` at step ``T``, one past the last trained step (as DeBERTa's linear decay always did).

**Unit.** The schedule is defined in optimizer steps, also with a batch-size warm-up (``data.batch_warmup``) or
sequence-length stages (``data.stages``), whose steps train fewer or other tokens: steps are what users write
(``warmup_steps``, ``max_steps``, ``decay_steps``, ``checkpoint_every_n_steps``), what checkpoints, validation and
cool-downs count and what checkpoints are named by, and the LR at step ``n`` then does not depend on the batch ramp
(a resume mid-ramp or a changed ramp leaves the LR curve as it was). :meth:`WarmupDecay.position` is the one place a
step becomes a schedule position. The tokens seen are logged beside it (``data/tokens_seen`` in ``metrics.csv``).

The multiplier is a callable object, so torch's ``LambdaLR`` saves its attributes (the schedule and the plan it
decays to) in every checkpoint. A resume compares the saved plan with the configured one and, when they differ,
says so once (:func:`extension_note`) and continues (:func:`follow_max_steps`):

- ``wsd`` while the resume point lies in the warm-up or the stable phase of both plans: the new plan is taken as it
  is. A larger ``max_steps`` lengthens the stable phase and the decay moves to the new end; a run cooled down from a
  stable-phase checkpoint (``python -m pretrain.cooldown``) is exactly a run that planned its decay there.
- otherwise (linear, cosine, or a WSD run already decaying) the LR continues from its value at the last trained
  step, as ``optim.on_extend`` asks: ``stretch`` (default) follows the rest of the curve, stretched to reach
  ``min_lr_ratio x lr`` at the new end (linear: a straight line; cosine and wsd: the rest of the cosine or of the
  decay shape); ``constant`` keeps that LR for every remaining step.

A resume whose plan is unchanged computes exactly what the uninterrupted run computes.
"""

from __future__ import annotations

import copy
import math

import torch

ON_EXTEND = ("stretch", "constant")
SCHEDULES = ("linear", "cosine", "wsd")
DECAY_SHAPES = ("1-sqrt", "linear")


def linear_warmup_decay(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: 0 -> 1 over ``warmup_steps``, then linearly to ``min_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    remaining = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / remaining)
    return max(min_ratio, 1.0 - progress * (1.0 - min_ratio))


def decay_length(max_steps: int, decay_steps: int | None, decay_fraction: float | None) -> int:
    """The WSD decay phase in steps: ``decay_steps`` when set, else ``round(decay_fraction x max_steps)``."""
    if decay_steps is not None:
        return int(decay_steps)
    return int(round(float(decay_fraction or 0.0) * max_steps))


def _cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _decay_curve(shape: str, progress: float) -> float:
    """``g(q)``: 1 at the start of the WSD decay, 0 at its end."""
    return 1.0 - math.sqrt(progress) if shape == "1-sqrt" else 1.0 - progress


class WarmupDecay:
    """LR multiplier of optimizer step ``step`` (0-based). Its attributes are saved with the scheduler's state; the
    class attributes below stand in for the ones a checkpoint written before they existed does not hold.

    ``anchor_step``/``anchor_ratio`` are set when the plan changed on a resume in a way the run cannot follow as
    planned: after warm-up the multiplier then goes from ``anchor_ratio`` at ``anchor_step`` (the last step trained
    before the change) along the rest of the curve to ``min_ratio`` at ``total_steps``, or stays at ``anchor_ratio``
    when ``hold``. ``anchor_progress`` is where on the curve (0..1) ``anchor_ratio`` lies (cosine and wsd)."""

    schedule = "linear"
    decay_steps = 0
    decay_shape = "1-sqrt"
    anchor_progress = 0.0

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float, schedule: str = "linear",
                 decay_steps: int = 0, decay_shape: str = "1-sqrt"):
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_ratio = min_ratio
        self.anchor_step: int | None = None
        self.anchor_ratio: float | None = None
        self.hold = False
        self.schedule, self.decay_steps, self.decay_shape = schedule, decay_steps, decay_shape
        self.anchor_progress = 0.0

    def position(self, step: int) -> int:
        """The schedule position of optimizer step ``step``: the step itself (see the module text, "Unit")."""
        return step

    @property
    def decay_start(self) -> int:
        """WSD: the first step of the decay phase."""
        return self.total_steps - self.decay_steps

    def planned(self, step: int) -> float:
        """The multiplier of the plan as built, without an anchor."""
        if self.schedule == "linear":
            return linear_warmup_decay(step, self.warmup_steps, self.total_steps, self.min_ratio)
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "cosine":
            progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
            return self.min_ratio + (1.0 - self.min_ratio) * _cosine(progress)
        if step < self.decay_start:
            return 1.0
        progress = min(1.0, (step - self.decay_start) / max(1, self.decay_steps))
        return self.min_ratio + (1.0 - self.min_ratio) * _decay_curve(self.decay_shape, progress)

    def __call__(self, step: int) -> float:
        step = self.position(step)
        if self.anchor_step is None or step < self.warmup_steps:
            return self.planned(step)
        if self.hold:
            return self.anchor_ratio
        if self.schedule == "linear":
            progress = min(1.0, max(0, step - self.anchor_step) / max(1, self.total_steps - self.anchor_step))
            return self.anchor_ratio + progress * (self.min_ratio - self.anchor_ratio)
        moved = min(1.0, max(0, step - self.anchor_step) / max(1, self.total_steps - self.anchor_step))
        progress = self.anchor_progress + (1.0 - self.anchor_progress) * moved
        curve = _cosine(progress) if self.schedule == "cosine" else _decay_curve(self.decay_shape, progress)
        return self.min_ratio + (1.0 - self.min_ratio) * curve

    def _progress_of(self, ratio: float) -> float:
        """Where on this schedule's post-warm-up curve (cosine) or decay curve (wsd) the multiplier ``ratio`` lies."""
        if self.min_ratio >= 1.0:
            return 0.0
        r = min(1.0, max(0.0, (ratio - self.min_ratio) / (1.0 - self.min_ratio)))
        if self.schedule == "cosine":
            return math.acos(2.0 * r - 1.0) / math.pi
        return (1.0 - r) ** 2 if self.decay_shape == "1-sqrt" else 1.0 - r

    def plan(self) -> tuple:
        """(schedule, total steps, decay steps, decay shape): what a resume compares (the last two for wsd only)."""
        if self.schedule != "wsd":
            return self.schedule, self.total_steps, 0, ""
        return self.schedule, self.total_steps, self.decay_steps, self.decay_shape

    def rebase(self, completed: int, total_steps: int, on_extend: str, schedule: str | None = None,
               decay_steps: int | None = None, decay_shape: str | None = None) -> None:
        """Continue after ``completed`` optimizer steps towards another plan (see the module text): ``total_steps``,
        and for ``schedule`` (default: unchanged) ``wsd`` its ``decay_steps`` and ``decay_shape``."""
        last = completed - 1
        before = self(last) if completed > 0 else 0.0
        schedule = schedule or self.schedule
        if schedule == "linear" == self.schedule:
            if last < self.warmup_steps - 1:  # still warming up: warm-up ends where it would have
                if on_extend == "constant":
                    self.anchor_step, self.anchor_ratio, self.hold = self.warmup_steps - 1, 1.0, True
            else:
                self.anchor_step, self.anchor_ratio, self.hold = last, before, on_extend == "constant"
            self.total_steps = total_steps
            return
        self.schedule, self.total_steps = schedule, total_steps
        if schedule == "wsd":
            self.decay_steps = self.decay_steps if decay_steps is None else decay_steps
            self.decay_shape = decay_shape or self.decay_shape
        self.anchor_step, self.anchor_ratio, self.hold, self.anchor_progress = None, None, False, 0.0
        warming_up = last < self.warmup_steps - 1
        if schedule == "wsd" and completed <= self.decay_start and (warming_up or before == 1.0):
            return  # warm-up or stable phase: the new plan as it is
        if warming_up:  # warm-up ends where it would have; then the new curve, or its peak held
            if on_extend == "constant":
                self.anchor_step, self.anchor_ratio, self.hold = self.warmup_steps - 1, 1.0, True
            return
        self.anchor_step, self.anchor_ratio, self.hold = last, before, on_extend == "constant"
        self.anchor_progress = self._progress_of(before)


def build_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float,
                   schedule: str = "linear", decay_steps: int = 0,
                   decay_shape: str = "1-sqrt") -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupDecay(warmup_steps, total_steps, min_ratio, schedule, decay_steps, decay_shape))


def _configured(schedule: WarmupDecay, max_steps: int, kind: str | None, decay_steps: int | None,
                decay_shape: str | None) -> tuple:
    """The plan tuple (as :meth:`WarmupDecay.plan`) the settings ask for; unnamed parts follow the saved plan."""
    kind = kind or schedule.schedule
    if kind != "wsd":
        return kind, max_steps, 0, ""
    return (kind, max_steps, schedule.decay_steps if decay_steps is None else decay_steps,
            decay_shape or schedule.decay_shape)


def follow_max_steps(scheduler: torch.optim.lr_scheduler.LRScheduler, max_steps: int, on_extend: str,
                     recorded: bool = True, schedule: str | None = None, decay_steps: int | None = None,
                     decay_shape: str | None = None) -> bool:
    """Once a resume has restored ``scheduler``: if its plan differs from the configured one (``max_steps``; for
    ``schedule``/``decay_steps``/``decay_shape`` None means as saved), rebase it and set the optimizer's LR for
    the next step. ``recorded``: False for a checkpoint written before the schedule's total was saved with it (the
    LR then follows ``max_steps`` from the next step). True if anything changed."""
    lambdas = getattr(scheduler, "lr_lambdas", None) or []
    schedules = list({id(f): f for f in lambdas if isinstance(f, WarmupDecay)}.values())
    completed = scheduler.last_epoch
    if not schedules or completed <= 0:
        return False
    wanted = _configured(schedules[0], max_steps, schedule, decay_steps, decay_shape)
    rebased = schedules[0].plan() != wanted
    if rebased:
        for each in schedules:
            each.rebase(completed, max_steps, on_extend, wanted[0], wanted[2], wanted[3] or None)
    elif recorded:
        return False
    lrs = [base * f(completed) for base, f in zip(scheduler.base_lrs, lambdas)]
    if all(group["lr"] == lr for group, lr in zip(scheduler.optimizer.param_groups, lrs)):
        return rebased
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
    return True


def _what_changed(old: WarmupDecay, wanted: tuple, completed: int) -> str:
    kind, total, decay, shape = wanted
    parts = []
    if old.schedule != kind:
        parts.append(f"optim.schedule changed from {old.schedule} to {kind}")
    if total != old.total_steps:
        parts.append(f"trainer.max_steps {'grew' if total > old.total_steps else 'shrank'} from {old.total_steps} "
                     f"to {total}")
    if kind == "wsd" == old.schedule and decay != old.decay_steps:
        parts.append(f"the decay phase changed from {old.decay_steps} to {decay} steps")
    if kind == "wsd" == old.schedule and shape != old.decay_shape:
        parts.append(f"optim.decay_shape changed from {old.decay_shape} to {shape}")
    return " and ".join(parts) + f" since the checkpoint (step {completed})"


def extension_note(state: dict, warmup_steps: int, max_steps: int, on_extend: str, min_lr_ratio: float,
                   schedule: str | None = None, decay_steps: int | None = None,
                   decay_shape: str | None = None) -> str | None:
    """The one warning for a resume whose plan (``trainer.max_steps``, and the rest as in
    :func:`follow_max_steps`) differs from the one the saved schedule (``state``: the scheduler's state in the
    checkpoint) was built for; None when nothing changes. Worked out from the checkpoint alone, so it is said
    before the progress bar is drawn."""
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
    old = WarmupDecay.__new__(WarmupDecay)
    old.__dict__.update(saved)
    wanted = _configured(old, max_steps, schedule, decay_steps, decay_shape)
    if old.plan() == wanted:
        return None
    new = copy.deepcopy(old)
    new.rebase(completed, max_steps, on_extend, wanted[0], wanted[2], wanted[3] or None)
    if completed < max_steps <= new.warmup_steps:
        return f"{_what_changed(old, wanted, completed)}: {_within_warmup(new, completed, base, max_steps)}"
    if old.schedule == "linear" == wanted[0]:
        return _linear_note(old, completed, base, max_steps, on_extend, min_lr_ratio)
    before, end, peak = base * old(completed - 1), base * new.min_ratio, base
    other = "constant" if on_extend == "stretch" else "stretch"
    curve = {"linear": "linearly", "cosine": "along a cosine",
             "wsd": f"with the {new.decay_shape} shape"}[new.schedule]
    if new.anchor_step is None and new.schedule == "wsd":
        what = (f"the stable phase now ends at step {new.decay_start}, then the LR decays {curve} to {end:.3g} at "
                f"step {max_steps}")
    elif new.anchor_step is None:
        what = f"warm-up ends at step {new.warmup_steps} as planned, then the LR decays {curve} to {end:.3g} at step " \
               f"{max_steps} (optim.on_extend={on_extend})"
    elif new.hold and new.anchor_step == new.warmup_steps - 1 and before < peak:
        what = (f"warm-up ends at step {new.warmup_steps} as planned, then the LR stays at {peak:.3g} "
                f"(optim.on_extend=constant; optim.on_extend=stretch would decay it to {end:.3g} at step {max_steps})")
    elif new.hold:
        what = (f"the LR stays at {before:.3g} (its value at step {completed}) for the remaining steps "
                f"(optim.on_extend=constant; optim.on_extend=stretch would decay it to {end:.3g} at step {max_steps})")
    else:
        what = (f"the LR decays on from {before:.3g} (its value at step {completed}) {curve} to {end:.3g} at step "
                f"{max_steps} (optim.on_extend={on_extend}; optim.on_extend={other} "
                f"{'keeps it at ' + format(before, '.3g') if other == 'constant' else 'would stretch the decay'})")
    return f"{_what_changed(old, wanted, completed)}: {what}"


def _within_warmup(schedule: WarmupDecay, completed: int, base: float, max_steps: int) -> str:
    """What happens when the new end comes before warm-up is over (or as it ends): every remaining step still warms
    up, so the LR only rises, whatever the schedule or ``optim.on_extend`` (both act after warm-up)."""
    last = base * schedule(max_steps - 1)  # the LR of step max_steps, the last trained (the multiplier is 0-based)
    cut = "cuts the warm-up short" if max_steps < schedule.warmup_steps else "comes as the warm-up ends"
    return (f"the new end {cut} (optim.warmup_steps={schedule.warmup_steps}): the LR keeps rising linearly, from "
            f"{base * schedule(completed):.3g} at step {completed + 1} to {last:.3g} at step {max_steps}, the last, "
            "and never decays (optim.on_extend acts only after warm-up)")


def _linear_note(schedule: WarmupDecay, completed: int, base: float, max_steps: int, on_extend: str,
                 min_lr_ratio: float) -> str:
    old_total = schedule.total_steps
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

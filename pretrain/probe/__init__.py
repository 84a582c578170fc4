"""Downstream probes: fine-tune checkpoints of a pretraining run on labelled tasks and record what each is worth.

Where things live: ``tasks`` (task files: reading, label lists, validation), ``batching`` (tokenising, length-grouped
dynamic padding), ``metrics`` (accuracy, F1, correlations, entity-level F1), ``models`` (what a MODEL argument names
and how it becomes a task model), ``finetune`` (one fine-tuning cell), ``results`` (``probes.csv``), ``export``
(transformers directories), ``watch`` (``--watch RUN``: a run's checkpoints as they are written), ``panel`` (the
report's downstream panels and the end-of-run summary lines), ``cli`` (``python -m pretrain.probe``). The task
heads are model code and live in :mod:`pretrain.model.task_heads`.
"""

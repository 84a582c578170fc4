"""One model's missing (task, seed) cells: fine-tuned, scored and appended to ``probes.csv``.

Why a module of its own: the command line (:mod:`pretrain.probe.cli`) and ``--watch`` (:mod:`pretrain.probe.watch`)
both probe models this way, and neither imports the other for it.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from pretrain import hf
from pretrain.probe import batching, models, results
from pretrain.probe.export import save_task_model
from pretrain.probe.finetune import default_settings, finetune
from pretrain.probe.tasks import Task


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def probe_source(source: models.ModelSource, tasks: list[Task], args: argparse.Namespace) -> str | None:
    """Fine-tune and score every missing (task, seed) cell of one model; each cell's rows are appended at once.
    Returns why a checkpoint of a run was skipped (a damaged one), None otherwise; a model named on its own that
    cannot be loaded raises."""
    done = results.done_cells(args.out)
    todo = [(t, s) for t in tasks for s in range(args.seeds)
            if results.cell_key(source.name, source.step, t.name, s) not in done]
    label = source.name + (f" @ step {source.step}" if source.step > 0 else "")
    if not todo:
        print(f"{label}: every cell already in {args.out / results.RESULTS}")
        return None
    try:
        directory = models.materialise(source, args.out)
    except models.ModelError as err:
        if source.kind != "checkpoint" or source.path == Path(source.name):
            raise  # a model named on its own must load; one checkpoint of a run is skipped, with the reason
        return str(err)
    tokenizer = batching.load_tokenizer(directory)
    factory = models.encoder_factory(source, directory)
    note = models.dropped_head(directory) if source.kind == "hf" else None
    if note:
        print(note, flush=True)
    hidden = hf.load_config(directory).hidden_size
    for task in tasks:
        seeds = [s for t, s in todo if t is task]
        if not seeds:
            continue
        settings = default_settings(len(task.rows["train"]), hidden, lr=args.lr, epochs=args.epochs,
                                    batch_size=args.batch_size, max_length=args.max_length)
        print(f"{label} | {task.name}: {settings.describe()}")
        encoded = {split: batching.encode_split(task, split, tokenizer, settings.max_length) for split in task.rows}
        for seed in seeds:
            start = time.perf_counter()
            model, scores = finetune(factory, task, encoded, tokenizer.pad_token_id, settings, seed, args.device)
            results.append_cell(args.out, source.name, source.step, task.name, seed, scores)
            shown = ", ".join(f"{split} {task.spec.metric} {m[task.spec.metric]:.4f}" for split, m in scores.items())
            print(f"{label} | {task.name} | seed {seed}: {shown} ({time.perf_counter() - start:.0f} s)", flush=True)
            if args.export:
                target = args.export / _slug(source.name) / f"step-{source.step}" / task.name / f"seed-{seed}"
                save_task_model(model.cpu().float(), target, tokenizer=tokenizer)
    return None

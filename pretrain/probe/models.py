"""What a MODEL argument of ``python -m pretrain.probe`` names, and how it becomes an encoder to fine-tune.

- a HuggingFace DebertaV2 directory (a run's ``hf/`` export, or a released model): its encoder weights. A released
  fine-tune (``DebertaV2ForSequenceClassification``/``ForTokenClassification``, or a ``--export`` of a probe) is
  probed the same way: its task head (pooler and classifier) is dropped, named in one note, and every task trains a
  fresh head. Reusing the old head would be wrong: it was trained for another label set (another number of labels,
  or the same number meaning other things), and even for the same labels it would carry that fine-tuning into
  the score, which then would no longer measure the encoder the way every other model here is measured (random
  init and checkpoints all start from a fresh head drawn from the probe seed);
- a training checkpoint (a Lightning ``.ckpt`` file or a DeepSpeed directory): verified the way resume verifies
  it (restricted unpickling, recorded sha256), exported once to ``OUT/.models/`` and read from there;
- a run directory (one with ``checkpoints/``): every checkpoint in it, one per pretraining step;
- ``random:PATH``: PATH's architecture (and tokenizer) with fresh weights drawn from the probe seed: the
  baseline every pretrained number is compared with.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from pretrain import hf
from pretrain.model import DebertaModel

MODEL_CACHE = ".models"
HEAD_PREFIXES = hf._IGNORED_PREFIXES  # the tensors of a fine-tune's task head, which the import leaves out


class ModelError(ValueError):
    """A MODEL argument that cannot be probed; the message names it and the fix."""


@dataclass
class ModelSource:
    name: str  # the MODEL argument (the run directory for each of its checkpoints)
    step: int  # pretraining step; -1 when unknown (a released model), 0 for random init
    kind: str  # "hf", "checkpoint" or "random"
    path: Path


def _checkpoint_step(path: Path) -> int:
    from pretrain.checkpointing.find import CheckpointError, read_metadata

    try:
        return int(read_metadata(path)["global_step"])
    except CheckpointError as err:
        raise ModelError(str(err)) from None


def run_checkpoints(run: Path) -> list[Path]:
    """A run's checkpoints, one per step (``step-N.ckpt`` preferred over ``last.ckpt`` and SLURM's saves)."""
    folder = run / "checkpoints"
    paths = sorted((p for p in folder.glob("step-*.ckpt") if re.fullmatch(r"step-\d+\.ckpt", p.name)),
                   key=lambda p: int(p.name[5:-5]))
    for extra in [folder / "last.ckpt", *sorted(run.glob("hpc_ckpt_*.ckpt"))]:
        if extra.exists() and not any(extra.resolve() == p.resolve() for p in paths):
            paths.append(extra)
    return paths


def resolve(argument: str) -> list[ModelSource]:
    """The model(s) one MODEL argument names; raises :class:`ModelError` naming it when it is none of them."""
    if argument.startswith("random:"):
        path = Path(argument[len("random:"):])
        hf.load_config(path)  # raises naming the file when PATH is not a model directory
        return [ModelSource(argument, 0, "random", path)]
    path = Path(argument)
    if not path.exists():
        raise ModelError(f"{path}: no such model directory, checkpoint or run directory")
    if path.is_dir() and (path / hf.CONFIG_NAME).is_file():
        hf.load_config(path)  # a model this framework cannot build is refused before anything is probed
        return [ModelSource(argument, -1, "hf", path)]
    if path.is_dir() and (path / "checkpoints").is_dir():
        found = run_checkpoints(path)
        if not found:
            raise ModelError(f"{path}: a run directory without checkpoints in {path / 'checkpoints'}; probe it "
                             "after its first checkpoint is written")
        sources = {}
        for ckpt in found:
            try:
                step = _checkpoint_step(ckpt)
            except ModelError as err:
                print(f"warning: skipping {ckpt}: {err}", file=sys.stderr)
                continue
            sources.setdefault(step, ModelSource(argument, step, "checkpoint", ckpt))
        return [sources[s] for s in sorted(sources)]
    if path.is_file() or (path / "checkpoint").is_dir():
        return [ModelSource(argument, _checkpoint_step(path), "checkpoint", path)]
    raise ModelError(f"{path}: not a model directory (no config.json), checkpoint or run directory (no "
                     "checkpoints/); pass an exported hf/ directory, a .ckpt file, a run directory or random:PATH")


def dropped_head(directory: Path) -> str | None:
    """The note for a fine-tuned model directory: which task-head tensors the probe leaves out (the import drops
    them), or None when it has none. Only tensor names are read."""
    names = [k for k in _tensor_names(directory) if k.startswith(HEAD_PREFIXES)]
    if not names:
        return None
    try:
        raw = json.loads((directory / hf.CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raw = {}
    kind = "/".join(str(a) for a in raw.get("architectures") or []) or "model"
    id2label = raw.get("id2label") if isinstance(raw.get("id2label"), dict) else {}
    ordered = [str(id2label[k]) for k in sorted(id2label, key=lambda k: (len(str(k)), str(k)))]  # "2" before "10"
    labels = f" (labels {', '.join(ordered)})" if ordered else ""
    return (f"note: {directory} is a {kind} fine-tune{labels}: its task head ({', '.join(names)}) is dropped; each "
            "task trains a fresh head on its encoder")


def _tensor_names(directory: Path) -> list[str]:
    """The tensor names of a model directory, from the safetensors header or the shard index (a ``.bin`` is read
    whole, with ``weights_only``)."""
    from safetensors import SafetensorError, safe_open

    for name in (hf.SAFE_WEIGHTS, hf.SAFE_INDEX, hf.TORCH_WEIGHTS, hf.TORCH_INDEX):
        file = directory / name
        if not file.is_file():
            continue
        try:
            if name == hf.SAFE_WEIGHTS:
                with safe_open(str(file), framework="pt") as weights:
                    return list(weights.keys())
            if name.endswith(".index.json"):
                return list(json.loads(file.read_text(encoding="utf-8"))["weight_map"])
            return list(hf.read_state_dict(directory)[0])
        except (OSError, ValueError, KeyError, TypeError, SafetensorError):  # the load that follows says why
            return []
    return []


def unfinished_deepspeed_save(path: Path, metadata: dict, live: bool = False) -> str | None:
    """What a DeepSpeed checkpoint directory still lacks of its ranks' files, or None (also for a checkpoint file).

    DeepSpeed's rank 0 writes ``latest`` as soon as its own files are written, without waiting for the other
    ranks, so a reader of a live multi-rank run can see ``latest`` before every rank's shard is there. Each rank
    writes ``zero_pp_rank_R_mp_rank_MM_optim_states.pt`` (under ZeRO-3 also ``..._model_states.pt``), then its
    ``.sha256``; ``metadata`` (rank 0's record) says how many ranks there were. With ``live`` a shard without its
    ``.sha256`` is still being finished."""
    from pretrain.checkpointing.files import checksum_path
    from pretrain.checkpointing.find import DEEPSPEED_TAG, is_deepspeed_checkpoint

    if not is_deepspeed_checkpoint(path):
        return None
    tag = path / DEEPSPEED_TAG
    kinds = ["optim_states"] + (["model_states"] if (tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file()
                                else [])
    for rank in range(int(metadata.get("dp_world_size") or 1)):
        for mp_rank in range(int(metadata.get("mp_world_size") or 1)):
            for kind in kinds:
                file = tag / f"zero_pp_rank_{rank}_mp_rank_{mp_rank:02d}_{kind}.pt"
                if not file.is_file():
                    return f"{file.relative_to(path)} (rank {rank}'s shard) is missing"
                if live and not checksum_path(file).is_file():
                    return f"{file.relative_to(path)} (rank {rank}'s shard) has no {checksum_path(file).name} yet"
    return None


def materialise(source: ModelSource, out: Path) -> Path:
    """The HuggingFace directory to read ``source`` from; a checkpoint is verified and exported (once) into
    ``OUT/.models/`` first."""
    if source.kind != "checkpoint":
        return source.path
    from pretrain.export import ExportError, export_objective, load_objective

    digest = hashlib.sha256(str(source.path.resolve()).encode()).hexdigest()[:12]
    target = out / MODEL_CACHE / f"step-{source.step}-{digest}"
    if (target / "hf" / hf.CONFIG_NAME).is_file():
        return target / "hf"
    from pretrain.checkpointing.find import CheckpointError, read_metadata

    try:
        unfinished = unfinished_deepspeed_save(source.path, read_metadata(source.path))
        if unfinished:  # DeepSpeed's consolidation would stop on it with a ValueError
            raise ModelError(f"{source.path}: {unfinished}; the save did not finish on every rank")
        with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed's consolidation prints its progress
            objective, tokenizer_dir = load_objective(source.path)  # verifies before anything unpickles freely
    except (ExportError, CheckpointError) as err:
        raise ModelError(str(err)) from None
    if not tokenizer_dir.is_dir():
        raise ModelError(f"{source.path}: the tokenizer recorded in the checkpoint ({tokenizer_dir}) is gone; export "
                         "the checkpoint with `python -m pretrain.export CKPT OUT --tokenizer DIR` and probe OUT/hf")
    export_objective(objective, target, tokenizer_dir)  # each directory is written atomically
    return target / "hf"


def encoder_factory(source: ModelSource, directory: Path) -> Callable[[int], DebertaModel]:
    """``factory(seed)``: a fresh copy of the encoder (loaded once), or a random init drawn from ``seed``."""
    if source.kind == "random":
        config = hf.load_config(directory)

        def fresh(seed: int) -> DebertaModel:
            torch.manual_seed(seed)
            return DebertaModel(config)
        return fresh
    try:
        encoder = hf.from_pretrained(directory, head="none")
    except hf.CheckpointError as err:
        raise ModelError(str(err)) from None
    state = {k: v.clone() for k, v in encoder.state_dict().items()}

    def pretrained(seed: int) -> DebertaModel:
        model = DebertaModel(encoder.config)
        model.load_state_dict(state)
        return model
    return pretrained

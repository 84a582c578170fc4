"""Continued pretraining: start a run from a released HuggingFace DebertaV2 directory (``model.init_from``).

Why a module of its own: starting from a checkpoint touches the configuration (the checkpoint's geometry wins),
the data (the checkpoint's tokenizer must be the one the shards were made with), the vocabulary (an extended
tokenizer needs more embedding rows) and, for DeBERTa-v3, the GDES bookkeeping. ``train`` makes two calls into
it: ``prepare`` before the objective is built and ``ContinuedStart.initialise`` right after.

Rules, all logged when they apply:

- **Configuration**: the architecture comes from ``init_from/config.json``; where the experiment's ``model``
  section differs, the checkpoint wins and a warning lists every differing field. One exception, the **context
  extension**: when the shards' sequences are longer than the checkpoint's ``max_position_embeddings`` and the
  experiment's ``max_position_embeddings`` covers them, the three context fields (``max_position_embeddings``,
  ``max_relative_positions``, ``position_buckets``) come from the experiment and the relative and absolute position
  tables are mapped onto them (``pretrain.model.context_extension`` has the rule). A generator from
  ``model.init_generator_from`` is extended by the same rule, from its own tables.
- **Tokenizer**: the tokenizer files in ``init_from`` must be the ones the shards were made with (checksum in the
  shards' manifest), or the shards' tokenizer must extend it (every old token keeps its id, as
  ``python -m data_prep tokenizer --extend`` guarantees). Anything else is an error.
- **Vocabulary extension**: ``vocab_size`` grows to cover the new tokenizer. Rows of old tokens are copied
  unchanged. The row of each new token is the mean of the rows of the pieces the *old* tokenizer splits the new
  token's text into (``▁`` read as a space, ``##`` dropped; [UNK] and a bare ``▁`` are not counted); when that
  leaves nothing, the mean of all old token rows. The MLM output bias of a new token is initialised the same way
  from the old biases, so the new token starts out about as likely as the pieces it replaces. Applies to the
  discriminator, the generator and the v2 MLM model alike.
- **v2 (MLM)**: the MLM model and head from ``init_from`` (both HF head layouts, see ``pretrain.hf``); the EMD's
  absolute position table from the checkpoint when present, else freshly initialised (HF checkpoints lack it).
- **v3 (RTD)**: the discriminator (and its RTD head when the directory has ``rtd_head.safetensors`` or original
  ``mask_predictions.*`` keys, else a fresh head) from ``init_from``. The generator from
  ``model.init_generator_from`` when given; otherwise it is built at ``objective.generator_layers`` (default half
  the depth) from the discriminator: its embeddings, relative-position table, nGiE convolution and first
  ``generator_layers`` layers are copies of the discriminator's, its MLM head and EMD position table are fresh.
  The GDES residual is then set so that ``generator_table + residual`` equals the released discriminator table
  bit for bit (with a derived generator the residual is zero). Without this the discriminator would silently start
  from the generator's embeddings (the "continuing from released checkpoints" trap).

Imports neither Lightning nor Hydra.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pretrain import hf
from pretrain.model import DebertaConfig, DebertaForMaskedLM, context_extension
from pretrain.settings import SettingsError

log = logging.getLogger(__name__)

WORD_TABLE = "deberta.embeddings.word_embeddings.weight"
MLM_BIAS = "lm_predictions.lm_head.bias"
# Fields that may differ between a v3 generator and its discriminator: depth, and the training-only dropouts.
_GENERATOR_FREE_FIELDS = {"num_hidden_layers", "hidden_dropout_prob", "attention_probs_dropout_prob"}


# ------------------------------------------------------------------------------------------------ vocabulary
@dataclass
class VocabExtension:
    """How the shards' tokenizer extends the checkpoint's: new ids and, for each, the old ids it is built from."""

    old_vocab_size: int
    new_vocab_size: int
    sources: dict[int, list[int]] = field(default_factory=dict)  # new id -> old ids (empty: mean of all old rows)
    old_ids: list[int] = field(default_factory=list)  # ids of every old token (unchanged rows)


def _vocab(tok) -> dict[str, int]:
    return {t: int(i) for t, i in tok.backend.get_vocab(with_added_tokens=True).items()}


def find_extension(old_dir: Path, new_dir: Path) -> VocabExtension | None:
    """The extension from the tokenizer in ``old_dir`` to the one in ``new_dir``; None if it is not one (some old
    token lost or changed its id, or nothing was added)."""
    from data_prep.text_tokenizer import load_tokenizer

    old, new = load_tokenizer(old_dir), load_tokenizer(new_dir)
    old_vocab, new_vocab = _vocab(old), _vocab(new)
    if any(new_vocab.get(token) != i for token, i in old_vocab.items()):
        return None
    added = {i: token for token, i in new_vocab.items() if token not in old_vocab}
    if not added:
        return None
    unusable = set(old.special_ids.values())
    bare_space = old.backend.token_to_id("\u2581")
    if bare_space is not None:
        unusable.add(bare_space)
    sources = {}
    for i, token in sorted(added.items()):
        text = token[2:] if token.startswith("##") else token.replace("\u2581", " ")
        ids = old.backend.encode(text, add_special_tokens=False).ids if text.strip() else []
        sources[i] = [j for j in ids if j not in unusable]
    return VocabExtension(old.vocab_size, new.vocab_size, sources, sorted(old_vocab.values()))


def resize_rows(table: torch.Tensor, new_rows: int, extension: VocabExtension) -> torch.Tensor:
    """``table`` ([V, ...]: word embeddings or MLM bias) grown to ``new_rows`` rows by the extension rule."""
    old_ids = torch.tensor([i for i in extension.old_ids if i < table.shape[0]])
    fallback = table[old_ids].mean(0)
    out = torch.empty((max(new_rows, table.shape[0]),) + tuple(table.shape[1:]), dtype=table.dtype)
    out[: table.shape[0]] = table
    out[table.shape[0]:] = fallback  # rows no token uses (vocab_size padding)
    for i, sources in extension.sources.items():
        out[i] = table[sources].mean(0) if sources else fallback
    out[old_ids] = table[old_ids]  # old tokens keep their rows exactly
    return out


def resize_state(state: dict[str, torch.Tensor], vocab_size: int, extension: VocabExtension) -> dict[str, torch.Tensor]:
    state = dict(state)
    for key in (WORD_TABLE, MLM_BIAS):
        if key in state:
            state[key] = resize_rows(state[key], vocab_size, extension)
    return state


# ------------------------------------------------------------------------------------------------ preparation
def _differences(a: DebertaConfig, b: DebertaConfig) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
    return [f"{k}: experiment {da[k]!r}, checkpoint {db[k]!r}" for k in sorted(da) if da[k] != db[k]]


@dataclass
class ContinuedStart:
    """What ``prepare`` resolved; ``initialise`` loads it into the freshly built objective."""

    init_from: Path
    init_generator_from: Path | None
    config: DebertaConfig
    extension: VocabExtension | None = None
    longer_context: bool = False  # the experiment extends the checkpoint's context (pretrain.model.context_extension)

    # ------------------------------------------------------------------------------------------ loading
    def _load(self, directory: Path, head: str, emd: bool = True) -> dict[str, torch.Tensor]:
        model = hf.from_pretrained(directory, head=head, enhanced_mask_decoder=emd)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if self.longer_context and any(getattr(model.config, k) != getattr(self.config, k)
                                       for k in context_extension.CONTEXT_FIELDS):
            state = context_extension.extend_state(state, model.config, self.config)  # (each source from its own)
        if self.extension is not None:
            state = resize_state(state, self.config.vocab_size, self.extension)
        return state

    def initialise(self, objective: Any) -> None:
        """Load the starting weights into an objective built by ``objectives.build.build_objective`` from these
        configs."""
        from pretrain.objectives.mlm import MaskedLMObjective
        from pretrain.objectives.rtd import ReplacedTokenDetectionObjective

        if isinstance(objective, MaskedLMObjective):
            objective.model.load_state_dict(self._load(self.init_from, "mlm", objective.model.has_emd))
            log.info("model.init_from=%s: MLM model loaded", self.init_from)
        elif isinstance(objective, ReplacedTokenDetectionObjective):
            self._initialise_rtd(objective)
        else:
            raise TypeError(f"model.init_from does not support {type(objective).__name__}")

    def _initialise_rtd(self, objective: Any) -> None:
        released = self._load(self.init_from, "rtd")
        if self.init_generator_from is not None:
            generator = self._load(self.init_generator_from, "mlm")
            log.info("model.init_generator_from=%s: generator loaded", self.init_generator_from)
        else:
            generator = derive_generator_state(objective.generator, released)
            log.info("generator: %d layers initialised from the discriminator's embeddings and first layers "
                     "(fresh MLM head)", objective.generator.config.num_hidden_layers)
        objective.generator.load_state_dict(generator)
        shared = {table for table, weight in objective.discriminator_tables().items() if weight is not None}
        own = {k: v for k, v in released.items()
               if not any(k == f"deberta.embeddings.{t}.weight" for t in shared)}
        missing, unexpected = objective.discriminator.load_state_dict(own, strict=False)
        if missing or unexpected:
            raise hf.CheckpointError(f"{self.init_from}: discriminator tensors do not fit the model "
                                     f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        targets = {t: released[f"deberta.embeddings.{t}.weight"] for t in shared
                   if f"deberta.embeddings.{t}.weight" in released}
        set_effective_tables(objective, targets, self.init_from)

    # ------------------------------------------------------------------------------------------ export
    def export_untrained(self, objective: Any, output_dir: Path, tokenizer_dir: Path,
                         info: dict | None = None) -> list[Path]:
        """``trainer.max_steps=0``: write each model in the layout of the directory it came from (same keys, same
        head layout, nothing the source lacks), so an untrained run's ``hf/`` equals the source tensor for tensor."""
        sources = {"hf": self.init_from, "hf_generator": self.init_generator_from}
        written = []
        for name, model in objective.export_models().items():
            source = sources.get(name)
            target = output_dir / name
            hf.remove_stale_staging(output_dir, name)
            if source is None:
                written.append(hf.save_pretrained(model, target, tokenizer=tokenizer_dir, info=info))
            else:
                written.append(save_like(model, source, target, tokenizer_dir, info))
        return written


def derive_generator_state(generator: DebertaForMaskedLM, released: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Generator state: its own fresh MLM head and EMD table, everything else copied from the discriminator
    (embeddings, relative-position table and norms, nGiE conv, and its first ``num_hidden_layers`` layers)."""
    state = generator.state_dict()
    layers = generator.config.num_hidden_layers
    out = {}
    for key, tensor in state.items():
        match = re.match(r"deberta\.encoder\.layer\.(\d+)\.", key)
        if key in released and (match is None or int(match.group(1)) < layers):
            out[key] = released[key].clone()
        else:
            out[key] = tensor.detach().clone()
    return out


def set_effective_tables(objective: Any, targets: dict[str, torch.Tensor], source: Path) -> None:
    """Make the discriminator's effective embedding tables equal ``targets`` exactly, whatever the sharing mode."""
    mode = objective.embedding_sharing
    if mode == "es":
        for table, target in targets.items():
            if not torch.equal(getattr(objective.generator.deberta.embeddings, table).weight, target):
                raise SettingsError(
                    f"objective.embedding_sharing=es ties the discriminator's {table} to the generator's, but the "
                    f"generator's differs from the one in {source}; use gdes (the v3 default) or nes, or drop "
                    "model.init_generator_from so the generator starts from the discriminator's table")
        return
    objective.set_discriminator_tables(targets)
    with torch.no_grad():
        effective = objective.discriminator_tables()
        for table, target in targets.items():
            if not torch.equal(effective[table], target):  # set_discriminator_tables guarantees it; say so if not
                raise RuntimeError(f"discriminator {table} does not reproduce {source} after initialisation")
    if mode == "gdes" and targets:
        log.info("GDES residual set: the discriminator's effective embeddings equal %s", source)


def _check_tokenizer(init_from: Path, shards) -> VocabExtension | None:
    """None when the shards were made with init_from's tokenizer; the extension when theirs extends it."""
    from data_prep.errors import DataPrepError

    try:
        shards.check_tokenizer(init_from)
        return None
    except DataPrepError as err:
        mismatch = str(err)
    extension = find_extension(init_from, shards.tokenizer_dir)
    if extension is None:
        raise SettingsError(
            f"model.init_from={init_from}: its tokenizer is not the one data.path={shards.path} was made with, nor "
            f"does the shards' tokenizer extend it ({mismatch}). Prepare the shards with the checkpoint's tokenizer: "
            f"`python -m data_prep shards --tokenizer {init_from} ...` (or extend it first with "
            f"`python -m data_prep tokenizer --extend {init_from}`)")
    log.warning("model.init_from=%s: the shards' tokenizer extends the checkpoint's by %d tokens; embeddings are "
                "resized (new rows = mean of their old sub-piece rows, old rows unchanged)", init_from,
                len(extension.sources))
    return extension


def prepare(settings, shards) -> tuple[Any, ContinuedStart | None]:
    """Resolve ``model.init_from``: (settings with the checkpoint's architecture, the start to load) or
    (settings unchanged, None) when no ``init_from`` is set. ``shards`` is the training ``ShardedDataset``."""
    init = settings.init
    if not init.init_from:
        return settings, None
    init_from = Path(init.init_from)
    config = hf.load_config(init_from)
    extended = context_extension.extended_config(settings.model, config, shards.seq_len)
    if extended is not None:
        log.warning("model.init_from=%s: %s", init_from, context_extension.describe(config, extended))
        config = extended
    differing = _differences(settings.model, config)
    if differing:
        log.warning("model.init_from=%s: the checkpoint's config.json wins over the experiment's model settings; "
                    "they differ in %s", init_from, "; ".join(differing))
    objective = settings.objective
    if objective.name == "rtd":
        if init.init_generator_from:
            generator_config = hf.load_config(init.init_generator_from)
            # extended by the same rule as the discriminator, then compared with the extended discriminator
            generator_extended = context_extension.extended_config(settings.model, generator_config, shards.seq_len)
            if generator_extended is not None:
                log.warning("model.init_generator_from=%s: %s", init.init_generator_from,
                            context_extension.describe(generator_config, generator_extended))
                generator_config = generator_extended
            _check_generator(config, generator_config, init.init_generator_from)
            objective = dataclasses.replace(objective, generator_layers=generator_config.num_hidden_layers)
        elif objective.generator_layers and objective.generator_layers > config.num_hidden_layers:
            raise SettingsError(f"objective.generator_layers={objective.generator_layers}: the discriminator in "
                                f"{init_from} has only {config.num_hidden_layers} layers to initialise it from")
    elif init.init_generator_from:
        raise SettingsError(f"model.init_generator_from={init.init_generator_from}: only used with objective=rtd "
                            f"(got objective.name={objective.name!r})")
    extension = _check_tokenizer(init_from, shards)
    if extension is not None:
        config = dataclasses.replace(config, vocab_size=max(config.vocab_size, extension.new_vocab_size))
    start = ContinuedStart(init_from, Path(init.init_generator_from) if init.init_generator_from else None, config,
                           extension, longer_context=extended is not None)
    return dataclasses.replace(settings, model=config, objective=objective), start


def _check_generator(disc: DebertaConfig, gen: DebertaConfig, path: str) -> None:
    a, b = disc.to_dict(), gen.to_dict()
    differing = [f"{k}: discriminator {a[k]!r}, generator {b[k]!r}" for k in sorted(a)
                 if k not in _GENERATOR_FREE_FIELDS and a[k] != b[k]]
    if differing:
        raise SettingsError(f"model.init_generator_from={path}: the generator must have the discriminator's "
                            f"architecture except depth; it differs in {'; '.join(differing)}")


# ------------------------------------------------------------------------------------------------ export
def save_like(model: Any, source: Path, target: Path, tokenizer_dir: Path, info: dict | None = None) -> Path:
    """Write ``model`` as ``source`` is laid out: the source's tensor names (bare or ``deberta.``-prefixed, legacy
    ``cls.predictions.*`` or ``lm_predictions.*`` head, tied copies included), only the tensors it has, and its
    ``legacy`` flag; the RTD head goes to ``rtd_head.safetensors`` only if the source had one there."""
    native = {k: v.detach() for k, v in model.state_dict().items()}
    raw, _ = hf.read_state_dict(source)
    tied = {"cls.predictions.decoder.weight": WORD_TABLE, "cls.predictions.decoder.bias": MLM_BIAS}
    main: dict[str, torch.Tensor] = {}
    skipped = []
    for key in raw:
        name = tied.get(key) or hf.to_native_key(key)
        if name in native:
            main[key] = native[name].contiguous().clone()
        else:
            skipped.append(key)
    if skipped:
        log.info("%s: %d tensor(s) of %s are not part of this model and are not written: %s", target, len(skipped),
                 source, skipped[:5])
    rtd = {}
    if (source / hf.RTD_HEAD_WEIGHTS).is_file():
        rtd = {k: native[k].contiguous().clone() for k in hf._load_one(source / hf.RTD_HEAD_WEIGHTS) if k in native}
    config = hf.hf_config_dict(model)
    source_config = json.loads((source / hf.CONFIG_NAME).read_text(encoding="utf-8"))
    config["legacy"] = any(k.startswith("cls.predictions.") for k in raw)
    if "architectures" in source_config:
        config["architectures"] = source_config["architectures"]

    weights = {hf.SAFE_WEIGHTS: main, **({hf.RTD_HEAD_WEIGHTS: rtd} if rtd else {})}
    return hf.write_model_directory(target, weights, config, tokenizer_dir, info)

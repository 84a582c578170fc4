"""DeBERTa-v3 replaced-token detection (ELECTRA-style) with gradient-disentangled embedding sharing (GDES).

A generator (MLM with the EMD, same width, fewer layers) fills masked positions with sampled tokens; the
discriminator predicts, for every non-padding token, whether it was replaced. Loss = MLM + ``rtd_weight`` * BCE,
under one optimiser (DeepSpeed supports one).

Embedding sharing (the v3 paper's ablation):

- ``gdes``: discriminator embedding = ``generator_embedding.detach() + residual`` with a zero-initialised residual.
  The RTD loss updates only the residual, the generator's table is moved only by the MLM loss.
- ``es``: the discriminator uses the generator's table directly (gradients from both losses).
- ``nes``: no sharing, each model has its own table.

The same applies to the absolute position table when the discriminator adds absolute positions to its input
(``position_biased_input``); v3 models do not, and then only the word table is shared, as in the original code.
"""

from __future__ import annotations

import torch
from torch import nn

from pretrain.model import IGNORE_INDEX, DebertaConfig, DebertaForMaskedLM, DebertaForReplacedTokenDetection
from pretrain.objectives.base import PretrainingObjective, SpecialTokens, masked_mean
from pretrain.objectives.masking import RTD_GENERATOR_MASKING, MaskingConfig, rtd_labels, sample_replacements
from pretrain.objectives.detection_metrics import detection_metrics

EMBEDDING_SHARING_MODES = ("gdes", "es", "nes")


class ReplacedTokenDetectionObjective(PretrainingObjective):
    def __init__(
        self,
        config: DebertaConfig,
        special: SpecialTokens,
        generator_config: DebertaConfig,
        embedding_sharing: str = "gdes",
        rtd_weight: float = 50.0,
        masking: MaskingConfig = RTD_GENERATOR_MASKING,
        temperature: float = 1.0,
        generator: DebertaForMaskedLM | None = None,
        discriminator: DebertaForReplacedTokenDetection | None = None,
    ):
        super().__init__()
        if embedding_sharing not in EMBEDDING_SHARING_MODES:
            raise ValueError(f"objective.embedding_sharing={embedding_sharing!r}: choose one of {EMBEDDING_SHARING_MODES}")
        self.special = special
        self.masking = masking
        self.rtd_weight = rtd_weight
        self.temperature = temperature
        self.embedding_sharing = embedding_sharing
        self.generator = generator if generator is not None else DebertaForMaskedLM(generator_config)
        self.discriminator = discriminator if discriminator is not None else DebertaForReplacedTokenDetection(config)
        if embedding_sharing != "nes":
            self._share_embeddings()

    # ------------------------------------------------------------------------------------------ sharing
    def _shared_tables(self) -> list[str]:
        tables = ["word_embeddings"]
        if self.discriminator.config.position_biased_input:
            tables.append("position_embeddings")
        return tables

    def _share_embeddings(self) -> None:
        gen, disc = self.generator.deberta.embeddings, self.discriminator.deberta.embeddings
        for table in self._shared_tables():
            gen_weight, disc_weight = getattr(gen, table).weight, getattr(disc, table).weight
            if gen_weight.shape != disc_weight.shape:
                raise ValueError(f"embedding sharing needs equal {table} shapes; generator {list(gen_weight.shape)} vs "
                                 f"discriminator {list(disc_weight.shape)}: use the same vocab_size/embedding_size "
                                 "or objective.embedding_sharing=nes")
            setattr(disc, table, None)  # the discriminator owns no copy: its table is derived from the generator's
            if self.embedding_sharing == "gdes":
                self.register_parameter(f"{table}_residual", nn.Parameter(torch.zeros_like(gen_weight)))

    def discriminator_tables(self) -> dict[str, torch.Tensor | None]:
        """Effective discriminator embedding tables (``None``: the discriminator's own table)."""
        out: dict[str, torch.Tensor | None] = {"word_embeddings": None, "position_embeddings": None}
        if self.embedding_sharing == "nes":
            return out
        gen = self.generator.deberta.embeddings
        for table in self._shared_tables():
            shared = getattr(gen, table).weight
            if self.embedding_sharing == "gdes":
                residual = getattr(self, f"{table}_residual")
                low = getattr(self, f"{table}_residual_low", None)
                if low is None:
                    out[table] = shared.detach() + residual
                else:  # exact start from released tables, see set_discriminator_tables
                    out[table] = (shared.detach().double() + residual.double() + low).to(residual.dtype)
            else:
                out[table] = shared
        return out

    def discriminator_embedding_inputs(self) -> dict[str, torch.Tensor | tuple[torch.Tensor, ...] | None]:
        """What the training step passes to the discriminator: as :meth:`discriminator_tables`, but GDES tables
        as ``(shared.detach(), residual)``, summed only for the rows looked up (``embeddings.lookup``) instead of
        materialising the vocabulary-sized sum every step. The rows are bit-identical: each element is one fp32
        addition either way."""
        if self.embedding_sharing != "gdes":
            return self.discriminator_tables()
        gen = self.generator.deberta.embeddings
        exact_start = [t for t in self._shared_tables() if hasattr(self, f"{t}_residual_low")]
        exact = self.discriminator_tables() if exact_start else {}  # the float64 sums, computed once
        out: dict[str, torch.Tensor | tuple[torch.Tensor, ...] | None] = {"word_embeddings": None,
                                                                           "position_embeddings": None}
        for table in self._shared_tables():
            out[table] = exact[table] if table in exact_start else (getattr(gen, table).weight.detach(),
                                                                    getattr(self, f"{table}_residual"))
        return out

    def set_discriminator_tables(self, tables: dict[str, torch.Tensor]) -> None:
        """Make the effective discriminator tables equal ``tables`` exactly (e.g. a released discriminator's
        embeddings when continuing pretraining): GDES residual = target - generator table; NES copies; ES cannot
        represent it.

        Why a second, frozen term for GDES: ``generator + (target - generator)`` rounds twice in the tables' dtype
        and can miss the target by a unit in the last place wherever the two tables differ much in magnitude. The
        rounding error of the residual is kept in float64 (``{table}_residual_low``, a buffer) and the effective
        table is then summed in float64, which gives the target bit for bit. The buffer exists only when it is
        not zero (a generator with its own released table), so other runs compute exactly as before.
        """
        with torch.no_grad():
            for table, target in tables.items():
                if self.embedding_sharing == "gdes":
                    shared = getattr(self.generator.deberta.embeddings, table).weight
                    exact = target.double() - shared.double()
                    residual = getattr(self, f"{table}_residual")
                    residual.copy_(exact)
                    low = exact - residual.double()
                    if low.any():
                        self.register_buffer(f"{table}_residual_low", low)
                    elif hasattr(self, f"{table}_residual_low"):
                        delattr(self, f"{table}_residual_low")
                elif self.embedding_sharing == "nes":
                    getattr(self.discriminator.deberta.embeddings, table).weight.copy_(target)
                else:
                    raise ValueError("embedding_sharing=es ties the discriminator table to the generator's; "
                                     "it cannot be set independently")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint of a run started from released tables carries the float64 rounding term: recreate its slot
        for table in ("word_embeddings", "position_embeddings"):
            key = f"{prefix}{table}_residual_low"
            if key in state_dict and not hasattr(self, f"{table}_residual_low"):
                self.register_buffer(f"{table}_residual_low", torch.zeros_like(state_dict[key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------------------------------ step
    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        input_ids = batch["input_ids"]
        attention_mask, masked_ids, labels = self.mask_batch(batch, self.generator.config.vocab_size, generator)
        gen_out = self.generator(masked_ids, attention_mask, labels=labels, use_emd=True,
                                 prediction_slots=self.prediction_slots(*masked_ids.shape))
        predicted = gen_out.prediction_targets != IGNORE_INDEX
        with torch.no_grad():
            sampled = sample_replacements(gen_out.logits.detach(), generator=generator, temperature=self.temperature)
            # Scatter the samples to their positions; empty logit rows point one past the end, into a spare slot.
            flat = torch.cat([input_ids.flatten(), input_ids.new_zeros(1)])
            disc_input = flat.scatter(0, gen_out.prediction_positions, sampled)[:-1].view_as(input_ids)
            replaced = rtd_labels(disc_input, input_ids, labels)
        tables = self.discriminator_embedding_inputs()
        disc_out = self.discriminator(
            disc_input, attention_mask, labels=replaced,
            word_embedding_weight=tables["word_embeddings"], position_embedding_weight=tables["position_embeddings"],
        )
        loss = gen_out.loss + self.rtd_weight * disc_out.loss
        with torch.no_grad():
            gen_accuracy = masked_mean(gen_out.logits.argmax(-1) == gen_out.prediction_targets, predicted)
            disc_accuracy = masked_mean((disc_out.logits > 0) == replaced.bool(), attention_mask)
            replaced_fraction = masked_mean(replaced, attention_mask)
            masked = gen_out.label_mask.sum()
            detection = detection_metrics(disc_out.logits.detach(), replaced, attention_mask)
        return {
            "loss": loss, "mlm_loss": gen_out.loss.detach(), "rtd_loss": disc_out.loss.detach(),
            "generator_accuracy": gen_accuracy, "discriminator_accuracy": disc_accuracy,
            "dropped_predictions": masked - predicted.sum(),
            "replaced_fraction": replaced_fraction, "masked_tokens": masked, **detection,
        }

    # ------------------------------------------------------------------------------------------ export
    def merged_discriminator(self) -> DebertaForReplacedTokenDetection:
        """A standalone discriminator whose embeddings are the effective (GDES-merged) tables."""
        merged = DebertaForReplacedTokenDetection(self.discriminator.config)
        state = {k: v.detach().clone() for k, v in self.discriminator.state_dict().items()}
        for table, weight in self.discriminator_tables().items():
            if weight is not None:
                state[f"deberta.embeddings.{table}.weight"] = weight.detach().clone()
        merged.load_state_dict(state)
        return merged.to(next(self.discriminator.parameters()).dtype)

    def export_models(self) -> dict[str, nn.Module]:
        return {"hf": self.merged_discriminator(), "hf_generator": self.generator}

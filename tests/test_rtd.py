"""v3 RTD objective: gradient-disentangled embedding sharing (GDES), ES and NES, on batches of real text."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_prep.reader import ShardedDataset
from pretrain.model import DebertaConfig, DebertaForReplacedTokenDetection
from pretrain.objectives.base import SpecialTokens
from pretrain.objectives.rtd import ReplacedTokenDetectionObjective


def config(layers: int) -> DebertaConfig:
    return DebertaConfig(vocab_size=1024, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, position_buckets=16,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def make(sharing: str, data: ShardedDataset) -> ReplacedTokenDetectionObjective:
    torch.manual_seed(0)
    ids = data.special_ids
    special = SpecialTokens(pad=ids["pad"], cls=ids["cls"], sep=ids["sep"], unk=ids["unk"], mask=ids["mask"])
    return ReplacedTokenDetectionObjective(config(2), special, config(1), embedding_sharing=sharing)


def real_batch(data: ShardedDataset, n: int = 6) -> dict[str, torch.Tensor]:
    items = [data[i] for i in range(n)]
    return {k: torch.as_tensor(np.stack([it[k] for it in items])) for k in ("input_ids", "word_start")}


@pytest.fixture(scope="module")
def data(shards):
    return ShardedDataset(shards)


def test_gdes_generator_embedding_gets_no_gradient_from_the_discriminator(data):
    objective = make("gdes", data)
    batch = real_batch(data)
    tables = objective.discriminator_tables()
    ids = batch["input_ids"]
    logits = objective.discriminator(ids, ids != 0, word_embedding_weight=tables["word_embeddings"]).logits
    logits.sum().backward()
    gen_embedding = objective.generator.deberta.embeddings.word_embeddings.weight
    assert gen_embedding.grad is None or torch.count_nonzero(gen_embedding.grad) == 0
    assert torch.count_nonzero(objective.word_embeddings_residual.grad) > 0


def test_es_shares_gradients_and_nes_keeps_separate_tables(data):
    batch = real_batch(data)
    ids = batch["input_ids"]
    es = make("es", data)
    tables = es.discriminator_tables()
    es.discriminator(ids, ids != 0, word_embedding_weight=tables["word_embeddings"]).logits.sum().backward()
    assert torch.count_nonzero(es.generator.deberta.embeddings.word_embeddings.weight.grad) > 0

    nes = make("nes", data)
    assert nes.discriminator.deberta.embeddings.word_embeddings is not None
    assert nes.discriminator_tables()["word_embeddings"] is None
    assert not hasattr(nes, "word_embeddings_residual")


def test_gdes_full_step_updates_generator_only_through_mlm(data):
    """The full RTD loss moves the generator's embedding exactly as its MLM loss alone does: no RTD gradient."""
    objective = make("gdes", data)
    batch = real_batch(data)
    out = objective(batch, torch.Generator().manual_seed(1))
    assert out["rtd_loss"] > 0 and out["replaced_fraction"] > 0
    out["loss"].backward()
    gen_grad = objective.generator.deberta.embeddings.word_embeddings.weight.grad.clone()
    assert torch.count_nonzero(objective.word_embeddings_residual.grad) > 0
    objective.zero_grad()
    # the same step's MLM loss alone (same masks) gives exactly the same generator-embedding gradient
    from pretrain.objectives.masking import mask_tokens

    ids = batch["input_ids"]
    g = torch.Generator().manual_seed(1)
    masked_ids, labels = mask_tokens(ids, batch["word_start"], objective.special.special_mask(ids), objective.masking,
                                     mask_token_id=objective.special.mask, vocab_size=1024, generator=g)
    objective.generator(masked_ids, ids != 0, labels=labels, use_emd=True).loss.backward()
    torch.testing.assert_close(objective.generator.deberta.embeddings.word_embeddings.weight.grad, gen_grad)


def test_exported_discriminator_equals_effective_embedding(data):
    objective = make("gdes", data)
    with torch.no_grad():
        objective.word_embeddings_residual.normal_(0, 0.02)
    merged = objective.merged_discriminator()
    expected = objective.generator.deberta.embeddings.word_embeddings.weight + objective.word_embeddings_residual
    assert torch.equal(merged.deberta.embeddings.word_embeddings.weight, expected.detach())
    batch = real_batch(data)
    ids = batch["input_ids"]
    with torch.no_grad():
        tables = objective.discriminator_tables()
        inside = objective.discriminator(ids, ids != 0, word_embedding_weight=tables["word_embeddings"]).logits
        assert torch.equal(merged.eval()(ids, ids != 0).logits, inside)


def test_residual_can_reproduce_a_released_discriminator_embedding(data):
    objective = make("gdes", data)
    released = DebertaForReplacedTokenDetection(config(2)).deberta.embeddings.word_embeddings.weight.detach()
    objective.set_discriminator_tables({"word_embeddings": released})
    assert torch.allclose(objective.discriminator_tables()["word_embeddings"], released, atol=1e-7, rtol=0)


def test_gdes_row_lookup_equals_the_summed_table(data):
    """The training step looks up (generator table, residual) rows and adds them instead of adding the two
    vocabulary-sized tables: the discriminator's output and the residual's gradient are bit-identical."""
    objective = make("gdes", data)
    with torch.no_grad():
        objective.word_embeddings_residual.normal_(std=0.02)  # a trained residual, not the zero start
    ids = real_batch(data)["input_ids"]
    results = []
    for tables in (objective.discriminator_tables(), objective.discriminator_embedding_inputs()):
        objective.zero_grad()
        logits = objective.discriminator(ids, ids != 0, word_embedding_weight=tables["word_embeddings"]).logits
        logits.sum().backward()
        results.append((logits.detach(), objective.word_embeddings_residual.grad.clone()))
    assert isinstance(objective.discriminator_embedding_inputs()["word_embeddings"], tuple)
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert results[0][1].abs().sum() > 0


@pytest.mark.parametrize("sharing", ["gdes", "es", "nes"])
def test_pad_row_of_the_discriminator_table_gets_no_gradient(data, sharing):
    """[PAD] ids at attended positions send no gradient to the [PAD] row of whichever table the discriminator
    trains (the GDES residual, the shared table, its own table), as ``nn.Embedding(padding_idx=0)`` would."""
    objective = make(sharing, data)
    ids = real_batch(data)["input_ids"].clone()
    ids[:, 3] = data.special_ids["pad"]
    tables = objective.discriminator_embedding_inputs()
    mask = torch.ones_like(ids, dtype=torch.bool)  # every position attended, the [PAD] ids included
    objective.discriminator(ids, mask, word_embedding_weight=tables["word_embeddings"]).logits.sum().backward()
    if sharing == "gdes":
        trained = objective.word_embeddings_residual
    elif sharing == "es":
        trained = objective.generator.deberta.embeddings.word_embeddings.weight
    else:
        trained = objective.discriminator.deberta.embeddings.word_embeddings.weight
    pad = data.special_ids["pad"]
    assert torch.count_nonzero(trained.grad[pad]) == 0
    assert torch.count_nonzero(trained.grad[ids[0, 0]]) > 0

"""The native model computes exactly what transformers' DebertaV2 computes (fp32, CPU, random weights).

Each config exercises a different set of architecture fields; every batch has padding and sequences longer than
``position_buckets`` so the log-bucketed distances are in play. Weights go HF -> directory -> ``from_pretrained``,
so the real loading path is what is tested.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from pretrain import hf
from pretrain.model import DebertaForMaskedLM

BASE = dict(
    vocab_size=320, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
    max_position_embeddings=96, relative_attention=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    layer_norm_eps=1e-7, initializer_range=0.05,
)
CONFIGS = {
    # v3 geometry: shared attention keys, both position terms, LayerNormed relative table, no absolute positions.
    "v3_style": dict(BASE, position_buckets=8, pos_att_type="p2c|c2p", share_att_key=True, norm_rel_ebd="layer_norm",
                     position_biased_input=False, legacy=False),
    # v2 with nGiE conv (grouped, gelu), a factorised embedding (E != H -> legacy head), absolute positions,
    # token types, separate position projections, raw relative table, different bucket size and range.
    "v2_style": dict(BASE, embedding_size=48, position_buckets=16, max_relative_positions=40, pos_att_type="c2p|p2c",
                     share_att_key=False, norm_rel_ebd="none", position_biased_input=True, type_vocab_size=2,
                     conv_kernel_size=3, conv_act="gelu", conv_groups=2, legacy=True),
    # No bucketing (plain clipped distances), c2p only, a different activation.
    "c2p_only_unbucketed": dict(BASE, position_buckets=-1, max_relative_positions=24, pos_att_type="c2p",
                                share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False,
                                hidden_act="gelu_new", legacy=False),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    hf_model = transformers.DebertaV2ForMaskedLM(transformers.DebertaV2Config(**CONFIGS[request.param])).eval()
    with torch.no_grad():  # HF zero-initialises the output bias; make it non-trivial so it is checked too
        head = hf_model.cls.predictions if hf_model.legacy else hf_model.lm_predictions.lm_head
        head.bias.normal_()
    directory = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(directory)
    native = hf.from_pretrained(directory).eval()
    assert isinstance(native, DebertaForMaskedLM)
    return request.param, hf_model, native


def batch(config_name: str):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, BASE["vocab_size"], (3, 57), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 41:] = 0  # padding in the batch
    mask[2, 20:] = 0
    ids[mask == 0] = 0
    types = (torch.arange(57) > 25).long().expand(3, -1) if config_name == "v2_style" else None
    return ids, mask, types


def test_hidden_states_and_logits_match_transformers(pair):
    name, hf_model, native = pair
    ids, mask, types = batch(name)
    with torch.no_grad():
        ref = hf_model(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        out = native(ids, mask, token_type_ids=types, output_hidden_states=True)
    valid = mask.bool()
    for layer, (a, b) in enumerate(zip(ref.hidden_states, out.hidden_states)):
        torch.testing.assert_close(b[valid], a[valid], atol=1e-5, rtol=0, msg=f"{name}: hidden state {layer}")
    torch.testing.assert_close(out.last_hidden_state[valid], ref.hidden_states[-1][valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits[valid], ref.logits[valid], atol=1e-4, rtol=0)
    # padded positions are not compared (their values are unspecified), but must not be NaN/inf
    assert torch.isfinite(out.logits).all()


def test_gradients_match_transformers(pair):
    """d(loss)/d(parameter) for every parameter, atol 2e-5 + rtol 1e-4 (fp32 accumulation-order noise)."""
    name, hf_model, native = pair
    ids, mask, types = batch(name)
    weights = torch.randn(3, 57, BASE["vocab_size"], generator=torch.Generator().manual_seed(2))
    valid = mask.bool()[..., None]
    hf_model.zero_grad()
    native.zero_grad()
    (hf_model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits * weights * valid).sum().backward()
    (native(ids, mask, token_type_ids=types).logits * weights * valid).sum().backward()
    native_params = dict(native.named_parameters())
    compared = 0
    for hf_name, p in hf_model.named_parameters():
        key = hf.to_native_key(hf_name)
        if key is None:
            continue
        assert key in native_params, f"{name}: no native parameter for {hf_name}"
        torch.testing.assert_close(native_params[key].grad, p.grad, atol=2e-5, rtol=1e-4, msg=f"{name}: grad {key}")
        compared += 1
    # every native parameter except the EMD-only position table has a reference gradient
    emd_only = {"deberta.embeddings.position_embeddings.weight"} if not native.config.position_biased_input else set()
    assert compared == len(native_params) - len(emd_only)


def sparse_labels(ids: torch.Tensor) -> torch.Tensor:
    """Labels at five positions (flat 3, 57+40, 114+1, 114+5, 114+19), -100 elsewhere."""
    labels = torch.full_like(ids, -100)
    labels[0, 3] = ids[0, 3]
    labels[1, 40] = ids[1, 40]
    labels[2, [1, 5, 19]] = ids[2, [1, 5, 19]]
    return labels


def test_masked_positions_only_logits_equal_full_logits(pair):
    """With labels, logits are computed only where labels != -100; they must equal those rows of the full logits."""
    name, _, native = pair
    ids, mask, types = batch(name)
    labels = sparse_labels(ids)
    with torch.no_grad():
        full = native(ids, mask, token_type_ids=types).logits
        part = native(ids, mask, token_type_ids=types, labels=labels)
    torch.testing.assert_close(part.logits, full[labels != -100])
    expected = torch.nn.functional.cross_entropy(full[labels != -100], labels[labels != -100])
    torch.testing.assert_close(part.loss, expected)


@pytest.mark.parametrize("slots", [8, 5, 3])
def test_fixed_prediction_slots(pair, slots):
    """A fixed number of logit rows (the sync-free path the objectives use): the first rows are the labelled
    positions in order, extra rows are empty (target -100, not in the loss), and with fewer slots than labels the
    loss is the mean over the labels that fit."""
    name, _, native = pair
    ids, mask, types = batch(name)
    labels = sparse_labels(ids)
    with torch.no_grad():
        full = native(ids, mask, token_type_ids=types).logits
        out = native(ids, mask, token_type_ids=types, labels=labels, prediction_slots=slots)
    flat = [0 * 57 + 3, 1 * 57 + 40, 2 * 57 + 1, 2 * 57 + 5, 2 * 57 + 19]
    kept = flat[:slots]
    assert out.logits.shape[0] == slots
    assert out.prediction_positions.tolist() == kept + [3 * 57] * (slots - len(kept))
    assert out.prediction_targets.tolist() == [labels.flatten()[i].item() for i in kept] + [-100] * (slots - len(kept))
    torch.testing.assert_close(out.logits[: len(kept)], full.flatten(0, 1)[kept])
    expected = torch.nn.functional.cross_entropy(full.flatten(0, 1)[kept], labels.flatten()[kept])
    torch.testing.assert_close(out.loss, expected)


def test_pad_row_gets_no_gradient_from_lookups(pair):
    """A real (attended) position that holds the [PAD] id does not move the [PAD] row, as ``padding_idx`` in
    transformers and the original code: the encoder's gradients, the word table's included, equal HF's."""
    name, hf_model, native = pair
    ids, mask, types = batch(name)
    ids[0, [5, 17]] = 0  # [PAD] ids at real positions
    assert ((ids == 0) & mask.bool()).any()
    weights = torch.randn(3, 57, BASE["hidden_size"], generator=torch.Generator().manual_seed(3))
    valid = mask.bool()[..., None]
    hf_model.zero_grad()
    native.zero_grad()
    hf_out = hf_model.deberta(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    (hf_out * weights * valid).sum().backward()
    (native.deberta(ids, mask, token_type_ids=types).last_hidden_state * weights * valid).sum().backward()
    grad = native.deberta.embeddings.word_embeddings.weight.grad
    assert torch.count_nonzero(grad[0]) == 0
    assert torch.count_nonzero(grad[ids[0, 0]]) > 0  # other looked-up rows do get gradient
    torch.testing.assert_close(grad, hf_model.deberta.embeddings.word_embeddings.weight.grad, atol=2e-5, rtol=1e-4)

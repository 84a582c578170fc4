"""Long context (2048 tokens): parity with transformers, the HF round trip, the fused kernel, training on CPU, and
continuing a 512-token checkpoint at 2048 (``pretrain.model.context_extension``; for v3, its discriminator and its
generator together).

Models are narrow (hidden 16) so a 2048-token forward pass costs little; the position settings are the real ones
(256 log buckets, bucketing range following max_position_embeddings or pinned at 512, and the unbucketed table).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from hydra import compose, initialize_config_dir

from pretrain import hf
from pretrain.model import DebertaConfig, DebertaForMaskedLM, DebertaModel, context_extension
from pretrain.settings import SettingsError
from pretrain.train import train
from test_hf_io import random_hf_mlm

REPO = Path(__file__).resolve().parents[1]
L = 2048
NARROW = dict(vocab_size=120, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
              max_position_embeddings=L, relative_attention=True, hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0, layer_norm_eps=1e-7, initializer_range=0.05)
POSITIONS = {
    # v2-style: unbucketed (the table has 2 x max_position_embeddings rows), nGiE conv, absolute positions added,
    # separate position projections, the legacy MLM head.
    "v2_unbucketed": dict(NARROW, position_buckets=-1, max_relative_positions=-1, pos_att_type="p2c|c2p",
                          share_att_key=False, norm_rel_ebd="none", position_biased_input=True, conv_kernel_size=3,
                          conv_act="gelu", legacy=True),
    # v3 as released, the range following max_position_embeddings: 256 buckets spread over 2048 distances.
    "v3_buckets_2048": dict(NARROW, position_buckets=256, max_relative_positions=-1, pos_att_type="p2c|c2p",
                            share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False, legacy=False),
    # v3 extended with its 512-token buckets kept: distances past 511 share the farthest rows.
    "v3_buckets_512": dict(NARROW, position_buckets=256, max_relative_positions=512, pos_att_type="p2c|c2p",
                           share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False, legacy=False),
}


def hf_model(name: str, seed: int = 0) -> transformers.DebertaV2ForMaskedLM:
    return random_hf_mlm(POSITIONS[name], seed, scale=0.02)


def long_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """One 2048-token row: 2000 tokens, then padding (distances up to 1999 in play, and the padding mask)."""
    ids = torch.randint(4, NARROW["vocab_size"], (1, L), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 2000:] = 0
    ids[mask == 0] = 0
    return ids, mask


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("name", sorted(POSITIONS))
def test_native_matches_transformers_at_2048(name, tmp_path):
    reference = hf_model(name)
    reference.save_pretrained(tmp_path)
    native = hf.from_pretrained(tmp_path).eval()
    ids, mask = long_batch()
    with torch.no_grad():
        ref = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        out = native(ids, mask, output_hidden_states=True)
    valid = mask.bool()
    for layer, (a, b) in enumerate(zip(ref.hidden_states, out.hidden_states)):
        torch.testing.assert_close(b[valid], a[valid], atol=1e-5, rtol=0, msg=f"{name}: hidden state {layer}")
    torch.testing.assert_close(out.logits[valid], ref.logits[valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["v2_unbucketed", "v3_buckets_2048"])
def test_export_round_trip_at_2048_is_exact(name, tmp_path):
    """native -> HF directory -> transformers (load, save) -> native: every tensor and the config unchanged."""
    torch.manual_seed(5)
    config = DebertaConfig.from_hf_dict(POSITIONS[name])
    native = DebertaForMaskedLM(config).eval()
    with torch.no_grad():
        for p in native.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hf.save_pretrained(native, tmp_path / "native")
    assert json.loads((tmp_path / "native" / "config.json").read_text())["max_position_embeddings"] == L
    reference = transformers.DebertaV2ForMaskedLM.from_pretrained(tmp_path / "native").eval()
    reference.save_pretrained(tmp_path / "transformers")
    back = hf.from_pretrained(tmp_path / "transformers").eval()
    assert back.config == native.config
    before, after = native.state_dict(), back.state_dict()
    # transformers drops the EMD-only absolute table when position_biased_input is false (never used there)
    emd_only = set() if config.position_biased_input else {"deberta.embeddings.position_embeddings.weight"}
    assert set(before) == set(after)
    for key in sorted(set(before) - emd_only):
        assert torch.equal(after[key], before[key]), key
    ids, mask = long_batch()
    with torch.no_grad():
        ref = reference(input_ids=ids, attention_mask=mask).logits
        out = back(ids, mask).logits
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ the kernel
def test_triton_kernel_matches_reference_at_2048(monkeypatch):
    """One head of width 16, 256 buckets pinned at 512: runs of one table row span most of the 2048 keys, so the
    segmented scans carry their sums across tiles (16 tiles per row). In the interpreter (CPU) the tiles are
    128 x 128 instead of its usual 16 x 16 (which the short-sequence tests keep): 64 times fewer tile steps."""
    pytest.importorskip("triton", reason="the `triton` package is not installed (pip install -e '.[test]')")
    from test_triton_attention import DEVICE, assert_same, make_inputs, outputs_and_grads

    from pretrain.model import triton_attention as kernels
    from pretrain.model.attention import reference_attention, triton_attention, triton_available
    from pretrain.model.relative_position import relative_position_index

    if not triton_available():
        pytest.skip("Triton needs a CUDA GPU or TRITON_INTERPRET=1")
    monkeypatch.setattr(kernels, "_INTERPRETER_CONFIG", kernels.LaunchConfig(128, 128, 1, 1))
    q, k, v, pos_key, pos_query, mask, grad_out = make_inputs(1, 1, L, 16, 256, True, True)
    rel_index = relative_position_index(L, L, 256, 256, 512, device=DEVICE)
    args = (q, k, v, pos_key, pos_query, rel_index, mask, grad_out, 0.25)
    assert_same(outputs_and_grads(reference_attention, *args), outputs_and_grads(triton_attention, *args), atol=2e-5)


# ------------------------------------------------------------------------------------------------ extension rule
def small(**fields) -> DebertaConfig:
    base = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                max_position_embeddings=512, position_buckets=256, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
    return DebertaConfig(**{**base, **fields})


def extend(old: DebertaConfig, seed: int = 0, **context) -> tuple[DebertaModel, DebertaModel]:
    torch.manual_seed(seed)
    model = DebertaModel(old).eval()
    new = dataclasses.replace(old, **context)
    longer = DebertaModel(new).eval()
    longer.load_state_dict(context_extension.extend_state(model.state_dict(), old, new))
    return model, longer


@pytest.mark.parametrize("old, context", [
    (small(), dict(max_position_embeddings=L, max_relative_positions=512)),  # v3 buckets kept
    (small(position_buckets=-1), dict(max_position_embeddings=L)),  # unbucketed: the table grows 1024 -> 4096
], ids=["buckets_kept", "unbucketed"])
def test_extension_that_keeps_every_distances_row_computes_what_the_checkpoint_computes(old, context):
    """At every length, 2048 included: the old model clamps long distances to its last rows, and the new rows
    start as exactly those rows."""
    model, longer = extend(old, **context)
    assert context_extension.changed_distances(old, longer.config).numel() == 0
    ids = torch.randint(4, 50, (1, L), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(longer(ids, mask).last_hidden_state, model(ids, mask).last_hidden_state,
                                   atol=0, rtol=0)


def test_extension_spreading_the_buckets_remaps_rows_by_distance():
    """256 buckets, range 512 -> 2048: no new rows; distances up to 129 keep theirs; longer distances start from
    the checkpoint's row of their bucket's shortest distance; everything past 511 starts as the old farthest row."""
    old = small()
    model, longer = extend(old, max_position_embeddings=L)
    new = longer.config
    before = model.encoder.rel_embeddings.weight
    after = longer.encoder.rel_embeddings.weight
    assert after.shape == before.shape

    def row(table, config, distance):
        return table[context_extension.table_row(torch.tensor([distance]), config)][0]

    for d in (0, 1, -1, 128, -128, 129, -129):
        assert torch.equal(row(after, new, d), row(before, old, d)), d
    changed = context_extension.changed_distances(old, new)
    # the last changed distances are those past 511 that share a new bucket with distances below 512
    shares_with_511 = context_extension.table_row(torch.arange(512, L), new) == context_extension.table_row(
        torch.tensor(511), new)
    assert changed.min() == 130 and changed.max() == 511 + int(shares_with_511.sum())
    # every distance starts from the checkpoint's row of the shortest distance in its new bucket
    new_rows = context_extension.table_row(torch.arange(L), new)
    for d in (130, 140, 200, 300, 511, 512):
        shortest = int(torch.nonzero(new_rows == new_rows[d])[0])
        assert torch.equal(row(after, new, d), row(before, old, shortest)), d
        assert torch.equal(row(after, new, -d), row(before, old, -shortest)), -d
        same = all(torch.equal(row(before, old, s * shortest), row(before, old, s * d)) for s in (1, -1))
        assert (d in changed) == (not same), d
    for d in (600, 2047):
        assert torch.equal(row(after, new, d), before[2 * 256 - 1])
        assert torch.equal(row(after, new, -d), before[0])


def test_more_buckets_reindex_the_table_by_distance():
    """256 -> 512 buckets: the table doubles and its centre moves; distances up to 256 (exact in the new table)
    start from the rows the checkpoint used for them."""
    old = small()
    model, longer = extend(old, max_position_embeddings=L, position_buckets=512)
    before, after = model.encoder.rel_embeddings.weight, longer.encoder.rel_embeddings.weight
    assert after.shape[0] == 1024
    for d in (0, 100, -100, 200, -200, 256, -256):
        assert torch.equal(after[512 + d], before[context_extension.table_row(torch.tensor([d]), old)][0]), d


def test_emd_position_table_is_tiled():
    old = small(max_position_embeddings=512)
    torch.manual_seed(0)
    model = DebertaForMaskedLM(old)
    new = dataclasses.replace(old, max_position_embeddings=L)
    state = context_extension.extend_state(model.state_dict(), old, new)
    table = state["deberta.embeddings.position_embeddings.weight"]
    old_table = model.deberta.embeddings.position_embeddings.weight
    assert table.shape[0] == L
    assert torch.equal(table[:512], old_table) and torch.equal(table[1536:], old_table)


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def shards_2048(shards, tmp_path_factory):
    """The session corpus and tokenizer packed at 2048 tokens by the real command (about 40 sequences)."""
    out = tmp_path_factory.mktemp("long") / "shards"
    subprocess.run([sys.executable, "-m", "data_prep", "shards", "--input", str(shards.parent / "corpus.jsonl"),
                    "--tokenizer", str(shards.parent / "tok"), "--out", str(out), "--seq-len", str(L),
                    "--workers", "1"], check=True, capture_output=True, cwd=REPO)
    return out


def run_config(shards: Path, output_dir: Path, steps: int, *extra: str):
    overrides = ["+experiment=quickstart", f"data.path={shards}", f"output_dir={output_dir}",
                 f"trainer.max_steps={steps}", "trainer.log_every_n_steps=1", "data.batch_size=1",
                 "data.num_workers=0", "optim.warmup_steps=1", "optim.lr=3e-3", "model.num_attention_heads=1",
                 "model.num_hidden_layers=1", "report=false", *extra]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def losses(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def test_tiny_model_trains_at_2048_on_cpu(shards_2048, tmp_path):
    train(run_config(shards_2048, tmp_path / "run", 4, f"model.max_position_embeddings={L}"))
    seen = losses(tmp_path / "run")
    assert len(seen) == 4 and seen[-1] < seen[0], seen
    assert hf.load_config(tmp_path / "run" / "hf").max_position_embeddings == L


def test_continue_a_512_checkpoint_at_2048(shards, shards_2048, tmp_path):
    """A 512-token checkpoint (exported untrained from a run on the 64-token shards) continued on 2048-token shards:
    refused with the fix named until the context is extended; extended, its tables start by the rule and the loss
    falls."""
    train(run_config(shards, tmp_path / "ckpt", 0, "model.max_position_embeddings=512"))
    source = tmp_path / "ckpt" / "hf"
    with pytest.raises(SettingsError, match=f"model.max_position_embeddings={L}"):
        train(run_config(shards_2048, tmp_path / "refused", 0, f"model.init_from={source}"))

    extend_args = (f"model.init_from={source}", f"model.max_position_embeddings={L}")
    train(run_config(shards_2048, tmp_path / "start", 0, *extend_args))
    old, new = hf.load_config(source), hf.load_config(tmp_path / "start" / "hf")
    assert (old.max_position_embeddings, new.max_position_embeddings) == (512, L)
    assert new.bucket_max_position == L and new.position_buckets == old.position_buckets
    expected = context_extension.extend_state(hf.from_pretrained(source).state_dict(), old, new)
    started = hf.from_pretrained(tmp_path / "start" / "hf").state_dict()
    assert set(started) == set(expected)
    for key in expected:
        assert torch.equal(started[key], expected[key]), key

    train(run_config(shards_2048, tmp_path / "run", 4, *extend_args))
    seen = losses(tmp_path / "run")
    assert len(seen) == 4 and seen[-1] < seen[0], seen


def test_v3_discriminator_extended_with_its_buckets_kept_computes_what_transformers_computes_at_2048(
        shards, shards_2048, tmp_path):
    """A released-style v3 discriminator (256 buckets, 512 positions, written by transformers) continued with RTD at
    2048 and ``max_relative_positions=512``: the extended discriminator, and the generator derived from it, start
    with the checkpoint's relative table, and the discriminator computes at 2048 tokens exactly what transformers
    computes with the checkpoint as released."""
    import shutil

    from data_prep.reader import ShardedDataset
    from pretrain import init_from
    from pretrain.objectives.base import SpecialTokens
    from pretrain.objectives.build import build_objective
    from pretrain.settings import settings_from_config

    ckpt = shutil.copytree(shards.parent / "tok", tmp_path / "ckpt")
    data = ShardedDataset(shards_2048)
    config = transformers.DebertaV2Config(**{**POSITIONS["v3_buckets_2048"], "max_position_embeddings": 512,
                                             "vocab_size": data.vocab_size})
    torch.manual_seed(3)
    released = transformers.DebertaV2Model(config).eval()
    with torch.no_grad():
        for p in released.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    released.save_pretrained(ckpt)

    settings = settings_from_config(run_config(shards_2048, tmp_path / "run", 1, "objective=rtd",
                                               f"model.init_from={ckpt}", f"model.max_position_embeddings={L}",
                                               "model.max_relative_positions=512", "model.position_buckets=256"))
    settings, start = init_from.prepare(settings, data)
    assert (settings.model.max_position_embeddings, settings.model.bucket_max_position) == (L, 512)
    ids = data.special_ids
    objective = build_objective(settings.model, settings.objective,
                                SpecialTokens(pad=ids["pad"], cls=ids["cls"], sep=ids["sep"], unk=ids["unk"],
                                              mask=ids["mask"]))
    start.initialise(objective)
    table = released.encoder.rel_embeddings.weight
    assert torch.equal(objective.discriminator.deberta.encoder.rel_embeddings.weight, table)
    assert torch.equal(objective.generator.deberta.encoder.rel_embeddings.weight, table)

    tokens = torch.from_numpy(data[0]["input_ids"])[None]  # a real 2048-token sequence of the sample
    assert tokens.shape == (1, L)
    mask = torch.ones_like(tokens)
    discriminator = objective.discriminator.eval()
    with torch.no_grad():
        ours = discriminator(tokens, mask, word_embedding_weight=objective.discriminator_tables()["word_embeddings"])
        theirs = released(input_ids=tokens, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(ours.last_hidden_state, theirs, atol=1e-5, rtol=0)


def test_rtd_continued_from_512_discriminator_and_generator_at_2048(shards, shards_2048, tmp_path):
    """A v3 (RTD) run at 512 positions exported its discriminator and generator (the generator with its EMD position
    table); both continue on 2048-token shards (``model.init_from`` + ``model.init_generator_from``). The generator
    is extended by the discriminator's rule from its own tables (relative rows mapped by distance, EMD rows tiled),
    trains at 2048, and its export loads in transformers covering 2048 positions and computes what ours computes."""
    from data_prep.reader import ShardedDataset

    train(run_config(shards, tmp_path / "ckpt", 0, "objective=rtd", "model.max_position_embeddings=512"))
    disc_dir, gen_dir = tmp_path / "ckpt" / "hf", tmp_path / "ckpt" / "hf_generator"
    old = {name: hf.from_pretrained(path, head=head).state_dict()
           for name, path, head in (("hf", disc_dir, "rtd"), ("hf_generator", gen_dir, "mlm"))}
    rel, emd = "deberta.encoder.rel_embeddings.weight", "deberta.embeddings.position_embeddings.weight"
    assert not torch.equal(old["hf"][rel], old["hf_generator"][rel]), "the generator has its own relative table"
    assert old["hf_generator"][emd].shape[0] == 512 and emd not in old["hf"]

    continued = (f"model.init_from={disc_dir}", f"model.init_generator_from={gen_dir}",
                 f"model.max_position_embeddings={L}", "objective=rtd")
    train(run_config(shards_2048, tmp_path / "start", 0, *continued))
    old_config = hf.load_config(disc_dir)
    assert hf.load_config(gen_dir).max_position_embeddings == old_config.max_position_embeddings == 512
    starts = {}
    for name in ("hf", "hf_generator"):
        new_config = hf.load_config(tmp_path / "start" / name)
        assert (new_config.max_position_embeddings, new_config.bucket_max_position) == (L, L), name
        started = starts[name] = hf.from_pretrained(tmp_path / "start" / name,
                                                    head="rtd" if name == "hf" else "mlm").state_dict()
        expected = context_extension.extend_state(old[name], hf.load_config(tmp_path / "ckpt" / name), new_config)
        assert set(started) == set(expected), name
        for key in expected:
            assert torch.equal(started[key], expected[key]), f"{name}: {key}"
        # the same distance mapping for both tables; the generator's EMD rows tiled from its own 512
        rows = context_extension.source_rows(old_config, new_config)
        assert torch.equal(started[rel], old[name][rel][rows]), name
    tiled = starts["hf_generator"][emd]
    assert tiled.shape[0] == L and all(torch.equal(tiled[i * 512:(i + 1) * 512], old["hf_generator"][emd])
                                       for i in range(L // 512))

    run = tmp_path / "run"
    train(run_config(shards_2048, run, 2, *continued))
    with open(run / "metrics.csv", newline="") as f:
        logged = [r for r in csv.DictReader(f) if r.get("train/mlm_loss")]
    assert len(logged) == 2 and all(math.isfinite(float(r["train/mlm_loss"])) and
                                    math.isfinite(float(r["train/rtd_loss"])) for r in logged), logged
    trained = hf.from_pretrained(run / "hf_generator", head="mlm").eval()
    assert not torch.equal(trained.state_dict()[rel], starts["hf_generator"][rel]), "the generator trained"
    reference = transformers.DebertaV2ForMaskedLM.from_pretrained(run / "hf_generator").eval()
    assert reference.config.max_position_embeddings == L
    tokens = torch.from_numpy(ShardedDataset(shards_2048)[0]["input_ids"])[None].long()
    assert tokens.shape == (1, L)
    mask = torch.ones_like(tokens)
    with torch.no_grad():
        theirs = reference(input_ids=tokens, attention_mask=mask).logits
        ours = trained(tokens, mask).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)

"""Continued pretraining from HuggingFace DebertaV2 checkpoints: a Chinese v2 MLM model with a WordPiece vocab.txt
(Erlangshen-style, legacy ``cls.predictions`` head) and a Korean v3 discriminator with a SentencePiece tokenizer.

The checkpoints are small random models written by transformers itself, with tokenizers made from the bundled
samples; shards are made from the bundled text with the checkpoint's own tokenizer by the real data_prep command.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from hydra import compose, initialize_config_dir
from safetensors.torch import save_file

from data_prep.reader import ShardedDataset
from pretrain import hf, init_from
from pretrain.model import DebertaForReplacedTokenDetection
from pretrain.objectives.build import build_objective
from pretrain.settings import SettingsError, settings_from_config
from pretrain.train import train
from shard_helpers import build_wordpiece_vocab, read_all, sample_documents, train_spm_tokenizer, write_jsonl

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 64
GEOMETRY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=SEQ_LEN, position_buckets=16, relative_attention=True,
                pos_att_type="p2c|c2p", position_biased_input=False, norm_rel_ebd="layer_norm", share_att_key=True,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # LayerNorms/biases start at 1/0: perturb so equality means something
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def make_shards(corpus: Path, tokenizer: Path, out: Path, *extra: str) -> Path:
    subprocess.run([sys.executable, "-m", "data_prep", "shards", "--input", str(corpus), "--tokenizer", str(tokenizer),
                    "--out", str(out), "--seq-len", str(SEQ_LEN), "--workers", "1", *extra],
                   check=True, capture_output=True, cwd=REPO)
    return out


@pytest.fixture(scope="module")
def zh(tmp_path_factory):
    """Erlangshen-style checkpoint: DebertaV2ForMaskedLM (legacy head, nGiE conv), WordPiece characters + jieba."""
    root = tmp_path_factory.mktemp("zh")
    docs = sample_documents("zh")
    ckpt = build_wordpiece_vocab(root / "ckpt", docs)
    vocab = (ckpt / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
    config = transformers.DebertaV2Config(vocab_size=len(vocab), conv_kernel_size=3, conv_act="gelu", **GEOMETRY)
    randomise(transformers.DebertaV2ForMaskedLM(config), 1).save_pretrained(ckpt)
    (root / "user_dict.txt").write_text("世界人权宣言 100 n\n", encoding="utf-8")
    shards = make_shards(write_jsonl(root / "corpus.jsonl", docs), ckpt, root / "shards", "--lang", "zh",
                         "--jieba-dict", str(root / "user_dict.txt"))
    return {"ckpt": ckpt, "shards": shards, "vocab": vocab, "root": root}


@pytest.fixture(scope="module")
def ko(tmp_path_factory):
    """v3 discriminator checkpoint (bare DebertaV2Model + rtd_head.safetensors), a 1-layer generator checkpoint
    with its own random embeddings, a DeBERTa SentencePiece tokenizer (▁ = eojeol starts)."""
    root = tmp_path_factory.mktemp("ko")
    docs = sample_documents("ko")
    ckpt = train_spm_tokenizer(root / "ckpt", docs, vocab_size=800)
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt)
    config = transformers.DebertaV2Config(vocab_size=len(tokenizer) + 7, **GEOMETRY)  # unused rows, like 128100
    randomise(transformers.DebertaV2Model(config), 2).save_pretrained(ckpt)
    head = randomise(DebertaForReplacedTokenDetection(hf.load_config(ckpt)).mask_predictions, 3)
    save_file({f"mask_predictions.{k}": v.contiguous() for k, v in head.state_dict().items()},
              str(ckpt / hf.RTD_HEAD_WEIGHTS))
    generator = root / "generator"
    gen_config = transformers.DebertaV2Config(**{**config.to_dict(), "num_hidden_layers": 1, "legacy": False})
    randomise(transformers.DebertaV2ForMaskedLM(gen_config), 4).save_pretrained(generator)
    corpus = write_jsonl(root / "corpus.jsonl", docs)
    return {"ckpt": ckpt, "generator": generator, "corpus": corpus, "root": root,
            "shards": make_shards(corpus, ckpt, root / "shards")}


def run_config(experiment: str, ckpt: Path, shards: Path, output_dir: Path, steps: int, *extra: str):
    overrides = [f"+experiment={experiment}", f"model.init_from={ckpt}", f"data.path={shards}",
                 f"output_dir={output_dir}", f"trainer.max_steps={steps}", "trainer.accelerator=cpu",
                 "trainer.devices=1", "trainer.precision=32-true", "trainer.log_every_n_steps=1",
                 "data.batch_size=8", "data.global_batch_size=8", "data.num_workers=0", "optim.warmup_steps=3", "optim.lr=3e-3",
                 *extra]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    state = hf.read_state_dict(directory)[0]
    if (directory / hf.RTD_HEAD_WEIGHTS).is_file():
        state.update(hf._load_one(directory / hf.RTD_HEAD_WEIGHTS))
    return state


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def losses(run_dir: Path, key: str = "train/loss") -> list[float]:
    import csv

    with open(run_dir / "metrics.csv", newline="") as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key)]


# ------------------------------------------------------------------------------------------------ Chinese v2
def test_zh_shards_use_jieba_words_with_the_user_dictionary(zh):
    ids, flags = read_all(zh["shards"])
    chars = [zh["vocab"].index(c) for c in "世界人权宣言"]
    for row in range(len(ids)):
        for start in np.flatnonzero(ids[row] == chars[0]):
            if list(ids[row, start:start + 6]) == chars:
                starts = (flags[row, start:start + 6] & 1).astype(bool)  # WORD_START bit
                assert starts.tolist() == [True, False, False, False, False, False]  # one unit, not 世界/人权/宣言
                return
    raise AssertionError("世界人权宣言 not found in the shards")


def test_zh_max_steps_0_reproduces_and_exports_the_source(zh, tmp_path, caplog):
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="pretrain.init_from"):
        _, objects = train(run_config("v2_zh_continue", zh["ckpt"], zh["shards"], run, 0))
    # the experiment asks for v2-large geometry; the checkpoint's wins, and the log says where they differ
    assert "checkpoint's config.json wins" in caplog.text
    assert "hidden_size: experiment 1024, checkpoint 32" in caplog.text
    assert "vocab_size" not in caplog.text  # model.vocab_size is null (unset): the checkpoint's, not a difference
    assert objects["settings"].model == hf.load_config(zh["ckpt"])
    assert_same_tensors(run / "hf", zh["ckpt"])  # legacy cls.predictions.* layout kept, nothing added

    source = transformers.AutoModelForMaskedLM.from_pretrained(zh["ckpt"]).eval()
    native = objects["module"].objective.model.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(run / "hf")
    ids = torch.tensor([tokenizer("人人生而自由，在尊严和权利上一律平等。")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(native(ids).logits, source(ids).logits, atol=1e-5, rtol=0)


def test_zh_loss_falls_and_fill_mask_matches_native(zh, tmp_path):
    run = tmp_path / "run"
    train(run_config("v2_zh_continue", zh["ckpt"], zh["shards"], run, 40))
    curve = losses(run)
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert last < first - 0.7, (first, last)  # 8.0 -> 7.0 (ln 3197 = 8.07: the random checkpoint knows nothing)

    model = transformers.AutoModelForMaskedLM.from_pretrained(run / "hf").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(run / "hf")
    fill = transformers.pipeline("fill-mask", model=model, tokenizer=tokenizer, top_k=5)
    text = f"人人生而自由，在尊严和权{tokenizer.mask_token}上一律平等。"
    predicted = [p["token"] for p in fill(text)]
    native = hf.from_pretrained(run / "hf").eval()
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        logits = native(ids).logits[0, ids[0].tolist().index(tokenizer.mask_token_id)]
    assert predicted == logits.topk(5).indices.tolist()


# ------------------------------------------------------------------------------------------------ Korean v3
def test_ko_max_steps_0_gdes_reproduces_the_released_discriminator(ko, tmp_path):
    run = tmp_path / "run"
    _, objects = train(run_config("v3_ko_continue", ko["ckpt"], ko["shards"], run, 0,
                                  f"model.init_generator_from={ko['generator']}"))
    objective = objects["module"].objective.eval()
    released = tensors(ko["ckpt"])["embeddings.word_embeddings.weight"]
    generator_table = objective.generator.deberta.embeddings.word_embeddings.weight
    assert not torch.equal(generator_table, released)  # the generator has its own table ...
    assert torch.equal(objective.discriminator_tables()["word_embeddings"], released)  # ... GDES reproduces E_D
    assert objects["settings"].objective.generator_layers == 1
    assert_same_tensors(run / "hf", ko["ckpt"])  # backbone and RTD head, tensor for tensor
    assert_same_tensors(run / "hf_generator", ko["generator"])

    source = transformers.AutoModel.from_pretrained(ko["ckpt"]).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(ko["ckpt"])
    ids = torch.tensor([tokenizer("모든 인간은 태어날 때부터 자유로우며 존엄과 권리에 있어 동등하다.")["input_ids"]])
    reference = hf.from_pretrained(ko["ckpt"]).eval()  # the released discriminator with its RTD head
    tables = objective.discriminator_tables()
    with torch.no_grad():
        out = objective.discriminator(ids, word_embedding_weight=tables["word_embeddings"])
        torch.testing.assert_close(out.last_hidden_state, source(input_ids=ids).last_hidden_state, atol=1e-5, rtol=0)
        assert torch.equal(out.logits, reference(ids).logits)


def test_ko_derived_generator_starts_exactly_and_loss_falls(ko, tmp_path):
    settings = settings_from_config(run_config("v3_ko_continue", ko["ckpt"], ko["shards"], tmp_path / "x", 1))
    settings, start = init_from.prepare(settings, ShardedDataset(settings.data.path))
    objective = build_objective(settings.model, settings.objective, special_tokens(settings.data.path))
    start.initialise(objective)
    released = tensors(ko["ckpt"])
    assert objective.generator.config.num_hidden_layers == 1  # half of 2
    assert torch.equal(objective.generator.deberta.embeddings.word_embeddings.weight,
                       released["embeddings.word_embeddings.weight"])
    assert torch.equal(objective.generator.deberta.encoder.layer[0].output.dense.weight,
                       released["encoder.layer.0.output.dense.weight"])
    assert torch.equal(objective.discriminator_tables()["word_embeddings"], released["embeddings.word_embeddings.weight"])

    run = tmp_path / "run"
    train(run_config("v3_ko_continue", ko["ckpt"], ko["shards"], run, 30))
    curve = losses(run)
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert last < 0.8 * first, (first, last)  # about 35 -> 20 (mlm + 50 * rtd) on this sample
    mlm = losses(run, "train/mlm_loss")
    assert sum(mlm[-5:]) / 5 < sum(mlm[:5]) / 5 - 0.5  # the fresh generator head learns
    model = transformers.AutoModel.from_pretrained(run / "hf").eval()
    fill = transformers.pipeline("fill-mask", model=str(run / "hf_generator"), tokenizer=str(run / "hf_generator"))
    assert len(fill("모든 인간은 태어날 때부터 [MASK] 존엄과 권리에 있어 동등하다.")) == 5
    assert model.config.num_hidden_layers == 2


def special_tokens(path):
    from pretrain.objectives.base import SpecialTokens

    ids = ShardedDataset(path).special_ids
    return SpecialTokens(pad=ids["pad"], cls=ids["cls"], sep=ids["sep"], unk=ids["unk"], mask=ids["mask"])


def test_vocabulary_extension_keeps_old_tokens(ko, tmp_path):
    extended = tmp_path / "tok_ext"
    result = subprocess.run([sys.executable, "-m", "data_prep", "tokenizer", "--input", str(ko["corpus"]),
                             "--vocab-size", "1200", "--lang", "ko", "--extend", str(ko["ckpt"]), "--out",
                             str(extended)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    shards = make_shards(ko["corpus"], extended, tmp_path / "shards")
    run = tmp_path / "run"
    _, objects = train(run_config("v3_ko_continue", ko["ckpt"], shards, run, 0,
                                  f"model.init_generator_from={ko['generator']}"))
    extension = init_from.find_extension(ko["ckpt"], extended)
    assert len(extension.sources) > 100
    old_tok = transformers.AutoTokenizer.from_pretrained(ko["ckpt"])
    new_tok = transformers.AutoTokenizer.from_pretrained(run / "hf")
    assert all(new_tok.convert_tokens_to_ids(t) == i for t, i in old_tok.get_vocab().items())
    source, exported = tensors(ko["ckpt"]), tensors(run / "hf")
    assert exported.keys() == source.keys()
    old, new = source["embeddings.word_embeddings.weight"], exported["embeddings.word_embeddings.weight"]
    assert new.shape[0] == objects["settings"].model.vocab_size >= len(new_tok) > old.shape[0] - 7
    old_ids = sorted(old_tok.get_vocab().values())
    assert torch.equal(new[old_ids], old[old_ids])
    # a new token's row is the mean of the rows of the old pieces its text splits into
    token_id, pieces = next((i, p) for i, p in extension.sources.items() if len(p) >= 2)
    assert torch.allclose(new[token_id], old[pieces].mean(0), atol=0, rtol=0)
    generator_old, generator_new = tensors(ko["generator"]), tensors(run / "hf_generator")
    assert torch.equal(generator_new["lm_predictions.lm_head.bias"][old_ids],
                       generator_old["lm_predictions.lm_head.bias"][old_ids])
    assert torch.equal(generator_new["lm_predictions.lm_head.bias"][token_id],
                       generator_old["lm_predictions.lm_head.bias"][pieces].mean(0))
    # GDES still reproduces the (resized) released discriminator exactly
    objective = objects["module"].objective
    assert torch.equal(objective.discriminator_tables()["word_embeddings"], new)
    # outputs on text made only of old tokens are unchanged
    ids = torch.tensor([old_tok("모든 인간은 태어날 때부터 자유로우며 존엄과 권리에 있어 동등하다.")["input_ids"]])
    with torch.no_grad():
        before = hf.from_pretrained(ko["ckpt"]).eval()(ids)
        after = hf.from_pretrained(run / "hf").eval()(ids)
    assert torch.equal(before.last_hidden_state, after.last_hidden_state)
    assert torch.equal(before.logits, after.logits)


# ------------------------------------------------------------------------------------------------ errors
def test_clear_errors(zh, ko, tmp_path):
    with pytest.raises(SettingsError, match=r"model.init_from=/nonexistent/ckpt: not a DeBERTa-v2/v3 checkpoint "
                                            r"directory .*not a directory"):
        train(run_config("v2_zh_continue", Path("/nonexistent/ckpt"), zh["shards"], tmp_path / "a", 1))
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text('{"model_type": "bert", "hidden_size": 32}')
    with pytest.raises(SettingsError, match=r"model.init_from=.*bert: .*'model_type' = 'bert'"):
        train(run_config("v2_zh_continue", bert, zh["shards"], tmp_path / "b", 1))
    with pytest.raises(SettingsError, match=r"model.init_from: required"):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            train(compose(config_name="config", overrides=[
                "+experiment=v2_zh_continue", f"data.path={zh['shards']}", "trainer.max_steps=1"]))
    with pytest.raises(SettingsError, match=r"its tokenizer is not the one data.path=.* was made with.*"
                                            r"python -m data_prep shards --tokenizer"):
        train(run_config("v3_ko_continue", zh["ckpt"], ko["shards"], tmp_path / "c", 1))


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")))
def test_every_experiment_takes_init_from(experiment, tmp_path):
    """``model.init_from`` / ``model.init_generator_from`` are keys of every experiment (README: any experiment
    takes them), not only of the *_continue ones."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+experiment={experiment}", f"model.init_from={tmp_path}",
                                                       f"model.init_generator_from={tmp_path}"])
    assert cfg.model.init_from == str(tmp_path) and cfg.model.init_generator_from == str(tmp_path)

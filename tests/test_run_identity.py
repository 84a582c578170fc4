"""A run is pinned to its exact data, tokenizer and global batch, and a refused resume leaves its record alone.

Attacks reproduced here, each on a tiny real training of the bundled English sample:

- shards of other text made with another tokenizer, holding exactly as many sequences, put where the run's shards
  were (``data.path`` unchanged): the resume is refused naming the tokenizer and the shard set, unless
  ``resume.allow_changes=[data.tokenizer,data.corpus]``; ``pretrain.export`` refuses to ship that tokenizer;
- ``data.path=[A,C]`` resumed as ``[C,A]`` (same counts, every position reading another sequence): refused;
- ``data.global_batch_size=8`` added to a run of batch 4, and dropped again: refused both ways;
- refused resumes (settings, an architecture change allowed by mistake, a data position that cannot load) leave
  ``config.yaml`` and ``config_changes.yaml`` byte for byte as they were.

Equal sequence counts come from ``--no-cross-document`` on one-sentence documents: one sequence per document
whatever the tokenizer.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from data_prep.mixture import open_corpus
from pretrain.checkpointing.find import read_metadata
from pretrain.datamodule import ShardDataModule
from pretrain.checkpointing.resume import ChangedSettingsError
from pretrain.settings import DataSettings, SettingsError
from pretrain.train import train
from shard_helpers import sample_documents, train_spm_tokenizer, write_jsonl

REPO = Path(__file__).resolve().parents[1]
N = 48  # sentences (= sequences) per shard set


def make_set(out: Path, sentences: list[str], tokenizer: Path) -> Path:
    corpus = write_jsonl(out.with_suffix(".jsonl"), sentences)
    subprocess.run([sys.executable, "-m", "data_prep", "shards", "--input", str(corpus), "--tokenizer", str(tokenizer),
                    "--out", str(out), "--seq-len", "64", "--workers", "1", "--no-cross-document"],
                   check=True, capture_output=True, cwd=REPO)
    return out


@pytest.fixture(scope="module")
def sets(shards, tmp_path_factory) -> dict[str, Path]:
    """a, c: two sets of other sentences with the `shards` tokenizer (1000 pieces); b1, b2: other sentences again,
    with an 800-piece tokenizer, as many sequences as a and c."""
    root = tmp_path_factory.mktemp("identity")
    sentences = [s.strip() for doc in sample_documents("en") for s in re.split(r"(?<=[.!?])\s+", doc)
                 if 5 <= len(s.split()) <= 20]
    other_tok = train_spm_tokenizer(root / "tok800", sentences[::2], vocab_size=800)
    chunks = [sentences[i * N:(i + 1) * N] for i in range(4)]
    made = {"a": make_set(root / "a", chunks[0], shards.parent / "tok"),
            "c": make_set(root / "c", chunks[1], shards.parent / "tok"),
            "b1": make_set(root / "b1", chunks[2], other_tok), "b2": make_set(root / "b2", chunks[3], other_tok)}
    lengths = {k: len(open_corpus(v)) for k, v in made.items()}
    assert lengths["a"] == lengths["b1"] == N and lengths["c"] == lengths["b2"] == N, lengths  # the attack's premise
    return made


def args(run: Path, paths: list[Path], steps: int, *extra: str) -> list[str]:
    return ["+experiment=quickstart", "objective=mlm", f"data.path=[{','.join(map(str, paths))}]",
            f"output_dir={run}", f"trainer.max_steps={steps}", "trainer.log_every_n_steps=1", "data.batch_size=4",
            "data.num_workers=0", "model.vocab_size=1024", "model.max_position_embeddings=64",
            "model.position_buckets=16", "optim.warmup_steps=2", "checkpoint_every_n_steps=2", "export_hf=false",
            "report=false", *extra]


def run_train(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return train(compose(config_name="config", overrides=list(overrides)))


@pytest.fixture(scope="module")
def base(sets, tmp_path_factory) -> Path:
    """Two steps on data.path=[a,c], batch 4 (no global batch set)."""
    run = tmp_path_factory.mktemp("base") / "run"
    run_train(*args(run, [sets["a"], sets["c"]], 2))
    return run


@pytest.fixture(scope="module")
def batch8(base, sets, tmp_path_factory) -> Path:
    """`base` resumed to step 4 with data.global_batch_size=8, allowed on purpose (accumulation 2)."""
    run = tmp_path_factory.mktemp("batch8") / "run"
    shutil.copytree(base, run, symlinks=True)
    _, out = run_train(*args(run, [sets["a"], sets["c"]], 4, "data.global_batch_size=8",
                             "resume.allow_changes=[data.global_batch_size]"))
    assert out["trainer"].accumulate_grad_batches == 2
    return run


def copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target, symlinks=True)
    return target


@contextlib.contextmanager
def put_in_place(target: Path, replacement: Path):
    """``replacement``'s shard set at ``target``'s path (as `data_prep shards --overwrite` would leave it)."""
    aside = target.with_name(target.name + ".orig")
    target.rename(aside)
    shutil.copytree(replacement, target)
    try:
        yield aside
    finally:
        shutil.rmtree(target)
        aside.rename(target)


def record_bytes(run: Path) -> dict[str, bytes | None]:
    return {name: (run / name).read_bytes() if (run / name).exists() else None
            for name in ("config.yaml", "config_changes.yaml")}


def test_tokenizer_swap_with_equal_counts_is_refused_unless_allowed(base, sets, tmp_path):
    run = copy(base, tmp_path)
    before = record_bytes(run)
    with put_in_place(sets["a"], sets["b1"]), put_in_place(sets["c"], sets["b2"]):
        with pytest.raises(ChangedSettingsError) as err:
            run_train(*args(run, [sets["a"], sets["c"]], 4))
        message = str(err.value)
        assert "data.tokenizer: the checkpoint was trained on shards made with tokenizer" in message
        assert f"data.corpus: other shard sets than the checkpoint was trained on: source 1 set 1: {sets['a']}" \
            in message
        assert "resume.allow_changes=[data.tokenizer,data.corpus]" in message
        assert record_bytes(run) == before
        _, out = run_train(*args(run, [sets["a"], sets["c"]], 4, "resume.allow_changes=[data.tokenizer,data.corpus]"))
        assert out["trainer"].global_step == 4
        new_checksum = open_corpus(sets["a"]).tokenizer_checksum
    record = read_metadata(run / "checkpoints" / "last.ckpt")["deberta_pretrain"]
    assert record["tokenizer_checksum"] == new_checksum != open_corpus(sets["a"]).tokenizer_checksum
    assert "data.tokenizer" in (run / "config_changes.yaml").read_text()


def test_reordered_sources_are_refused(base, sets, tmp_path):
    run = copy(base, tmp_path)
    before = record_bytes(run)
    with pytest.raises(ChangedSettingsError) as err:
        run_train(*args(run, [sets["c"], sets["a"]], 4))
    assert (f"data.corpus: the same shard sets in another order: {sets['a']}, {sets['c']} in the checkpoint, "
            f"{sets['c']}, {sets['a']} now") in str(err.value)
    assert record_bytes(run) == before


def test_global_batch_is_compared_as_its_effective_value_both_ways(base, batch8, sets, tmp_path):
    run = copy(base, tmp_path)
    with pytest.raises(ChangedSettingsError, match=r"data.global_batch_size: 4 in the checkpoint, 8 now"):
        run_train(*args(run, [sets["a"], sets["c"]], 4, "data.global_batch_size=8"))
    run = copy(batch8, tmp_path / "dropped")
    with pytest.raises(ChangedSettingsError, match=r"data.global_batch_size: 8 in the checkpoint, 4 now"):
        run_train(*args(run, [sets["a"], sets["c"]], 6))
    # the same global batch from other keys is the same run: 8 = 8 x 1 rank x accumulation 1
    _, out = run_train(*args(run, [sets["a"], sets["c"]], 6, "data.batch_size=8"))
    assert out["trainer"].global_step == 6 and out["trainer"].accumulate_grad_batches == 1


def test_refused_resumes_leave_the_run_record_untouched(batch8, sets, tmp_path):
    run = copy(batch8, tmp_path)
    before = record_bytes(run)
    assert before["config_changes.yaml"] and b"data.global_batch_size" in before["config_changes.yaml"]
    same = [*args(run, [sets["a"], sets["c"]], 6, "data.global_batch_size=8")]
    with pytest.raises(ChangedSettingsError, match="optim.lr"):
        run_train(*same, "optim.lr=0.01")
    with pytest.raises(ChangedSettingsError, match=r"cannot be loaded into the changed model:\n  - model.deberta."
                       r"embeddings.LayerNorm.bias: \[64\] in the checkpoint, \[96\] now"):
        run_train(*same, "model.hidden_size=96", "resume.allow_changes=[model.hidden_size]")
    with pytest.raises(ChangedSettingsError, match=r"resume.allow_changes accepts .*objective.name.* cannot be loaded"):
        run_train(*same, "objective=rtd", "resume.allow_changes=[objective]")
    # allowed other data whose data position cannot load (another count): refused inside the load itself
    with pytest.raises(SettingsError, match="checkpoint data position was saved for 96 sequences"):
        run_train(*args(run, [sets["a"]], 6, "data.global_batch_size=8", "resume.allow_changes=[data.corpus]"))
    assert record_bytes(run) == before


def test_export_refuses_a_tokenizer_the_checkpoint_was_not_trained_with(base, sets, tmp_path, capsys):
    from pretrain.export import main

    checkpoint = str(base / "checkpoints" / "last.ckpt")
    with put_in_place(sets["a"], sets["b1"]) as original:  # the recorded tokenizer directory now holds another
        assert main([checkpoint, str(tmp_path / "out")]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"{sets['a'] / 'tokenizer'}: this tokenizer (checksum" in errors[0]
        assert "is not the one" in errors[0] and not (tmp_path / "out" / "hf").exists()
        assert main([checkpoint, str(tmp_path / "out"), "--tokenizer", str(sets["b2"] / "tokenizer")]) == 2
        assert main([checkpoint, str(tmp_path / "out"), "--tokenizer", str(original / "tokenizer")]) == 0
    assert (tmp_path / "out" / "hf" / "config.json").is_file()


def test_mixture_weights_are_compared_as_proportions(sets):
    def module(weights):
        return ShardDataModule(DataSettings(sources=[{"path": str(sets["a"]), "weight": weights[0]},
                                                     {"path": str(sets["c"]), "weight": weights[1]}]))

    saved = module([0.7, 0.3])
    saved.consumed = 24
    state = saved.state_dict()
    same = module([7, 3])
    same.load_state_dict(state)
    assert same.consumed == 24
    with pytest.raises(SettingsError, match=r"weights \[0.7, 0.3\]"):
        module([0.6, 0.4]).load_state_dict(state)

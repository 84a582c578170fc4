"""``python -m pretrain`` before Hydra runs: the overrides are checked against the settings (``pretrain.overrides``)
and the settings are checked before a run directory exists; valid override forms pass through unchanged, and a
valid key the config does not list needs no ``+``. The model's vocab_size follows the shards' tokenizer unless set."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from pretrain.overrides import check_overrides
from pretrain.settings import VOCAB_PADDING, SettingsError, settings_from_config

REPO = Path(__file__).resolve().parents[1]


def test_valid_override_forms_pass(shards):
    arguments = ["+experiment=quickstart", "model=tiny", "objective=rtd", "~trainer.gradient_clip_val",
                 "++trainer.log_every_n_steps=1", "trainer.enable_model_summary=false", "model.pad_token_id=0",
                 f"data.path={shards}", "+optim.fused=false", "resume.allow_changes=[optim.lr]",
                 "hydra.job.chdir=false"]
    checked = check_overrides(arguments)
    rewritten = {"trainer.enable_model_summary=false", "model.pad_token_id=0"}  # valid, not in the config
    assert checked.overrides == [f"++{a}" if a in rewritten else a for a in arguments]
    cfg = checked.config
    assert cfg.objective.name == "rtd" and cfg.model.hidden_size == 64 and "gradient_clip_val" not in cfg.trainer
    assert cfg.trainer.log_every_n_steps == 1 and cfg.trainer.enable_model_summary is False
    assert cfg.model.pad_token_id == 0 and cfg.optim.fused is False and list(cfg.resume.allow_changes) == ["optim.lr"]


def _tokenizer_ids(shards: Path) -> int:
    return json.loads((shards / "manifest.json").read_text())["tokenizer"]["vocab_size"]


def test_a_run_with_a_trainer_argument_the_config_lacks_and_the_tokenizers_vocab_size(shards, tmp_path):
    """Also: model.vocab_size unset follows the shards' tokenizer, the run record holds the number, and the run
    resumes (the resumed model has the same size)."""
    run = tmp_path / "run"

    def cli(steps: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pretrain", "+experiment=quickstart", "model=tiny",
                               "objective=mlm", f"data.path={shards}", f"output_dir={run}",
                               f"trainer.max_steps={steps}",
                               "data.num_workers=0", "model.max_position_embeddings=64", "export_hf=false",
                               "report=false", "~trainer.gradient_clip_val", "trainer.enable_model_summary=false",
                               "checkpoint_every_n_steps=1"], cwd=REPO, capture_output=True, text=True, timeout=600)

    result = cli(1)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["trainer"]["enable_model_summary"] is False and "gradient_clip_val" not in saved["trainer"]
    assert "++trainer.enable_model_summary=false" in (run / ".hydra" / "overrides.yaml").read_text()
    assert saved["model"]["vocab_size"] == _tokenizer_ids(shards)
    result = cli(2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout + result.stderr and "rows larger" not in result.stderr


def _settings(shards, run_dir, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+experiment=quickstart", f"data.path={shards}",
                                                       f"output_dir={run_dir}", "model.max_position_embeddings=64",
                                                       *overrides])
    return cfg, settings_from_config(cfg)


def test_vocab_size_follows_the_tokenizer_and_an_oversized_one_warns(shards, tmp_path, caplog):
    ids = _tokenizer_ids(shards)
    cfg, settings = _settings(shards, tmp_path / "a")
    assert settings.model.vocab_size == ids and cfg.model.vocab_size == ids
    assert "rows larger" not in caplog.text
    _, settings = _settings(shards, tmp_path / "a", f"model.vocab_size={ids + VOCAB_PADDING}")  # alignment padding
    assert settings.model.vocab_size == ids + VOCAB_PADDING and "rows larger" not in caplog.text
    _, settings = _settings(shards, tmp_path / "a", "model.vocab_size=4096")
    assert settings.model.vocab_size == 4096
    assert f"model.vocab_size=4096 is {4096 - ids} rows larger than the shards' tokenizer ({ids} ids)" in caplog.text
    with pytest.raises(SettingsError, match=f"the shards' tokenizer has {ids} ids but model.vocab_size={ids - 1}"):
        _settings(shards, tmp_path / "a", f"model.vocab_size={ids - 1}")


def test_a_resumed_run_keeps_the_vocab_size_of_its_record(shards, tmp_path):
    """A run made when the model's size was set elsewhere (its config.yaml says 4096) resumes with that size."""
    run = tmp_path / "old"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    (run / "config.yaml").write_text("model:\n  vocab_size: 4096\n")
    _, settings = _settings(shards, run)
    assert settings.model.vocab_size == 4096


def test_one_launch_checks_its_settings_once(shards, tmp_path, monkeypatch):
    """``python -m pretrain`` checks the settings before Hydra creates the run directory; the run takes that check's
    result instead of checking again (a check reads every shard set's manifest and an init_from checkpoint's
    config.json), and logs its warnings once, in the run's log."""
    import logging

    from hydra.core.global_hydra import GlobalHydra

    import pretrain.__main__ as entry
    import pretrain.settings
    import pretrain.train

    checks, real = [], pretrain.settings.settings_from_config

    def counted(cfg, warn=True):
        checks.append(warn)
        return real(cfg, warn)

    for module in (pretrain.settings, pretrain.train):
        monkeypatch.setattr(module, "settings_from_config", counted)
    monkeypatch.setattr(entry, "_CHECKED", {})
    run = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["pretrain", "+experiment=quickstart", "model=tiny", "objective=mlm",
                                      f"data.path={shards}", f"output_dir={run}", "trainer.max_steps=1",
                                      "data.num_workers=0", "model.max_position_embeddings=64",
                                      "model.vocab_size=4096", "export_hf=false", "report=false"])
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        entry.main()  # Hydra's own run, in this process
    finally:
        GlobalHydra.instance().clear()
        root.handlers[:], root.level = handlers, level
    assert checks == [False]  # the check before Hydra; the run reused it
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "pretrain.log").read_text().count("model.vocab_size=4096 is") == 1

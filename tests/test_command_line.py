"""``python -m pretrain`` before Hydra runs: the overrides are checked against the settings (``pretrain.overrides``)
and the settings are checked before a run directory exists; valid override forms pass through unchanged, and a
valid key the config does not list needs no ``+``."""

import subprocess
import sys
from pathlib import Path

import yaml

from pretrain.overrides import check_overrides

REPO = Path(__file__).resolve().parents[1]


def test_valid_override_forms_pass(shards, tmp_path):
    arguments = ["+experiment=quickstart", "model=tiny", "objective=rtd", "~trainer.gradient_clip_val",
                 "++trainer.log_every_n_steps=1", "trainer.enable_model_summary=false", "model.pad_token_id=0",
                 f"data.path={shards}", "+optim.fused=false", "resume.allow_changes=[optim.lr]", "hydra.job.chdir=false"]
    checked = check_overrides(arguments)
    rewritten = {"trainer.enable_model_summary=false", "model.pad_token_id=0"}  # valid, not in the config
    assert checked.overrides == [f"++{a}" if a in rewritten else a for a in arguments]
    cfg = checked.config
    assert cfg.objective.name == "rtd" and cfg.model.hidden_size == 64 and "gradient_clip_val" not in cfg.trainer
    assert cfg.trainer.log_every_n_steps == 1 and cfg.trainer.enable_model_summary is False
    assert cfg.model.pad_token_id == 0 and cfg.optim.fused is False and list(cfg.resume.allow_changes) == ["optim.lr"]


def test_a_run_with_a_trainer_argument_the_config_lacks(shards, tmp_path):
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "pretrain", "+experiment=quickstart", "model=tiny", "objective=mlm",
                             f"data.path={shards}", f"output_dir={run}", "trainer.max_steps=2", "data.num_workers=0",
                             "model.vocab_size=1024", "model.max_position_embeddings=64", "export_hf=false",
                             "report=false", "~trainer.gradient_clip_val", "trainer.enable_model_summary=false"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["trainer"]["enable_model_summary"] is False and "gradient_clip_val" not in saved["trainer"]
    assert "++trainer.enable_model_summary=false" in (run / ".hydra" / "overrides.yaml").read_text()

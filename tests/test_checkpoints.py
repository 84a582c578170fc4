"""Which checkpoint a re-run resumes from: the newest of last.ckpt and SLURM's hpc_ckpt_N.ckpt, complete ones only."""

from __future__ import annotations

import torch

from pretrain.checkpointing.find import newest_checkpoint as _newest


def newest_checkpoint(output_dir):
    point = _newest(output_dir)
    return None if point is None else (point.path, point.step)


def save(path, step):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step}, path)


def test_newest_of_last_and_requeue_checkpoints(tmp_path):
    assert newest_checkpoint(tmp_path) is None
    save(tmp_path / "checkpoints" / "last.ckpt", 100)
    assert newest_checkpoint(tmp_path) == (tmp_path / "checkpoints" / "last.ckpt", 100)
    save(tmp_path / "hpc_ckpt_1.ckpt", 130)  # SIGUSR1 before the time limit: saved after the last periodic one
    assert newest_checkpoint(tmp_path) == (tmp_path / "hpc_ckpt_1.ckpt", 130)
    save(tmp_path / "checkpoints" / "last.ckpt", 200)  # the requeued job trained on and checkpointed again
    assert newest_checkpoint(tmp_path) == (tmp_path / "checkpoints" / "last.ckpt", 200)
    save(tmp_path / "hpc_ckpt_2.ckpt", 200)  # same step: last.ckpt, as a run that was never signalled
    assert newest_checkpoint(tmp_path)[0] == tmp_path / "checkpoints" / "last.ckpt"


def test_interrupted_deepspeed_directory_is_not_a_candidate(tmp_path):
    save(tmp_path / "checkpoints" / "last.ckpt", 10)
    partial = tmp_path / "hpc_ckpt_1.ckpt"  # DeepSpeed writes `latest` last: without it the save was interrupted
    save(partial / "checkpoint" / "mp_rank_00_model_states.pt", 20)
    assert newest_checkpoint(tmp_path) == (tmp_path / "checkpoints" / "last.ckpt", 10)
    (partial / "latest").write_text("checkpoint")
    assert newest_checkpoint(tmp_path) == (partial, 20)

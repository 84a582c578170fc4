"""Run ``python -m pretrain ARGS`` and record what every rank trains on (used by test_mixtures.py).

``POSITIONS_DIR=DIR python tests/position_runner.py ARGS...`` appends one JSON line per trained micro-batch to
``DIR/rank-<global rank>.jsonl``: the optimizer step, the global data position before the micro-batch, the world
size, the accumulation, a sha1 of each sequence's token ids and the micro-batch's loss; also the micro-batch's first
slot and slots per sample (``start``, ``m``: equal to ``consumed`` and 1 without sequence-length stages) and its
sequence length. The test maps the position back to sequences through the corpus's
global order and checks they are the sequences trained on, so resume is checked by content, not only by losses.
A test can also install ``recording_step`` itself (monkeypatch) for an in-process run.
Lightning's subprocess launcher re-runs this script (not ``-m pretrain``) for the other ranks, so every rank
records.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pretrain.__main__ import main
from pretrain.lightning_module import PretrainingModule

_real_step = PretrainingModule.training_step


def flags_sha1(word_start, special) -> str:
    """sha1 of one sequence's word-start and special-token flags (as bool arrays)."""
    return hashlib.sha1(word_start.astype(bool).tobytes() + special.astype(bool).tobytes()).hexdigest()


def recording_step(self, batch, batch_idx):
    datamodule = self.trainer.datamodule
    rows = batch["input_ids"].cpu().numpy()
    consumed = int(datamodule.consumed)
    start, m = datamodule.micro_batch_start()
    record = {"step": int(self.global_step), "consumed": consumed, "start": int(start), "m": int(m),
              "seq_len": int(rows.shape[1]), "rank": int(self.global_rank),
              "world": int(self.trainer.world_size), "accumulate": int(self.trainer.accumulate_grad_batches),
              "sha1": [hashlib.sha1(row.tobytes()).hexdigest() for row in rows],
              "flags_sha1": [flags_sha1(w, s) for w, s in zip(batch["word_start"].cpu().numpy(),
                                                              batch["special_tokens_mask"].cpu().numpy())]}
    loss = _real_step(self, batch, batch_idx)
    record["loss"] = float(loss.detach())
    out = Path(os.environ["POSITIONS_DIR"]) / f"rank-{self.global_rank}.jsonl"
    with open(out, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    return loss


if __name__ == "__main__":  # this script stays __main__, so the launcher re-runs it for the other ranks
    PretrainingModule.training_step = recording_step
    main()

"""``python tests/elastic_probe.py OVERRIDES...``: ``python -m pretrain`` that also saves the state it starts
training from, for the elastic-resume tests.

With ``ELASTIC_PROBE_SAVE=DIR`` set, every rank saves a checkpoint to ``DIR`` at the start of training (after the
checkpoint has been restored, before the first step), through the strategy as a normal checkpoint is: under
DeepSpeed a ZeRO directory holding this run's own partitions of the weights and AdamW moments. Lightning starts
the other ranks by re-running this script, so each of them saves its part.
"""

import functools
import os
import sys
from pathlib import Path

from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.__main__ import main  # noqa: E402


class SaveAtTrainStart(Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer, pl_module) -> None:
        trainer.save_checkpoint(self.path)

if __name__ == "__main__":
    target = os.environ["ELASTIC_PROBE_SAVE"]
    import lightning

    original = lightning.Trainer.__init__

    @functools.wraps(original)  # the settings check reads Trainer's signature
    def patched(self, *args, callbacks=None, **kwargs):
        original(self, *args, callbacks=[*(callbacks or []), SaveAtTrainStart(target)], **kwargs)

    lightning.Trainer.__init__ = patched
    main()

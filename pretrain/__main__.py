"""``python -m pretrain +experiment=NAME [overrides...]``: Hydra entry point (``--help``, ``--cfg job`` work)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from pretrain.settings import SettingsError


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from data_prep.errors import DataPrepError
    from pretrain.hf import CheckpointError
    from pretrain.model import ConfigError
    from pretrain.train import train  # heavy imports after Hydra has parsed the command line

    try:
        train(cfg)
    except (SettingsError, DataPrepError, CheckpointError, ConfigError) as err:
        # bad input (config, shards, checkpoint directories): one message naming what to fix, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

"""``python -m pretrain +experiment=NAME [overrides...]``: Hydra entry point (``--help``, ``--cfg job`` work)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from pretrain.settings import SettingsError


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from pretrain.train import train  # heavy imports after Hydra has parsed the command line

    try:
        train(cfg)
    except SettingsError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

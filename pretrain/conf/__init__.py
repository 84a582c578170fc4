"""Hydra configuration of ``python -m pretrain`` (a package so that Hydra finds it in an installed copy too)."""

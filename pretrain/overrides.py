"""The command line's overrides, checked before Hydra composes the config.

Why: Hydra stops at the first key it cannot override and advises ``+key=value``, the wrong fix for a misspelt key
(it adds the misspelling, which the settings check then rejects). Here every override is checked at once against
the keys a run understands (the composed config's keys, the typed settings' fields of :mod:`pretrain.settings` and
``lightning.Trainer``'s arguments), and every unknown key is named in one line with its nearest valid keys. A valid
key that the config does not list (``trainer.fast_dev_run=1``, ``model.pad_token_id=0``) is passed on to Hydra as
``++key=value``, so it needs no ``+``.

Composing costs a fraction of a second; torch and Lightning are imported only when a key is missing from the
composed config (the settings' fields and Trainer's arguments live there), so a valid command line reaches the
run lock before anything heavy is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from data_prep.errors import did_you_mean, nearest

CONF_DIR = Path(__file__).resolve().parent / "conf"
_ABSENT = object()


class OverrideError(ValueError):
    """Unknown keys or config choices on the command line; the message names each with its nearest valid ones."""


@dataclass
class CheckedOverrides:
    overrides: list[str]
    """The overrides as given, except valid keys the config does not list, spelt ``++key=value``."""
    config: DictConfig | None
    """The config they compose to (without Hydra's own section), or None where it could not be composed here (Hydra
    then reports why)."""


# Groups in conf/ that other commands read; a run composes none of them.
OTHER_GROUPS = {"probe": "the downstream tasks of `python -m pretrain.probe MODEL --task NAME`"}


def groups() -> dict[str, list[str]]:
    """Config groups (``model=tiny``, ``+experiment=NAME``) and their choices, from the files in conf/."""
    return {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in sorted(CONF_DIR.iterdir())
            if d.is_dir() and d.name not in OTHER_GROUPS}


@lru_cache(maxsize=1)
def _known_keys() -> dict[str, set[str]]:
    from pretrain.settings import known_keys  # torch: only when a key is missing from the composed config

    return known_keys()


@lru_cache(maxsize=1)
def _trainer_arguments() -> set[str]:
    from pretrain.settings import trainer_arguments  # Lightning: only for a trainer key the config does not list

    return trainer_arguments()


def _exists(cfg: DictConfig, key: str) -> bool:
    return OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False,
                            throw_on_resolution_failure=False) is not _ABSENT


def _key_problem(cfg: DictConfig, key: str) -> str | None:
    """Why ``key`` is no setting (with the nearest valid keys), or None when it is one; the first two levels are
    checked (deeper ones lie inside a setting's value: ``data.sources.0.weight``)."""
    parts = key.split(".")
    if len(parts) > 2:
        parts = parts[:2]
    if _exists(cfg, ".".join(parts)):
        return None
    section, name = parts if len(parts) == 2 else ("", parts[0])
    known = _known_keys()
    if section not in known and section != "trainer":
        sections = sorted([s for s in known if s] + ["trainer"])
        close = nearest(section, sections)
        hint = (f"did you mean {' or '.join(f'{s}.{name}' for s in close)}?" if close
                else f"sections: {', '.join(sections)}")
        return f"{key}: no such section {section!r} ({hint})"
    if section == "trainer":
        valid = _trainer_arguments() | set(cfg.get("trainer") or {})
        if name in valid:
            return None
        hint = did_you_mean(name, valid, "trainer.") or "see lightning.Trainer's arguments"
        return f"{key}: neither a setting nor a lightning.Trainer argument ({hint})"
    valid = known[section] | set(cfg if not section else (cfg.get(section) or {}))
    if name in valid:
        return None
    prefix = f"{section}." if section else ""
    return f"{key}: no such setting ({did_you_mean(name, valid, prefix) or 'valid: ' + ', '.join(sorted(valid))})"


def check_overrides(arguments: list[str]) -> CheckedOverrides:
    """Check the command line's overrides; raises one :class:`OverrideError` naming every unknown key and choice."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        parsed = OverridesParser.create().parse_overrides(arguments)
    except HydraException:
        return CheckedOverrides(list(arguments), None)  # not an override's syntax: Hydra says where
    choices = groups()
    problems: list[str] = []
    composing, values = [], []  # group choices (the defaults list), then the values set on top of it
    # config directories of the user's own (hydra.searchpath=[...]) may hold more choices than conf/
    searched = any(override.key_or_group == "hydra.searchpath" for override in parsed)
    for override, argument in zip(parsed, arguments):
        key = override.key_or_group
        if key == "hydra.searchpath":
            composing.append(argument)
            continue
        if key.split(".")[0] == "hydra" or override.package is not None or "/" in key:
            continue  # Hydra's own settings, packages, nested groups: Hydra checks them
        if key.split(".")[0] in OTHER_GROUPS:
            problems.append(f"{argument}: conf/{key.split('.')[0]}/ holds {OTHER_GROUPS[key.split('.')[0]]}, not a "
                            "training setting")
            continue
        if key in choices or (searched and "." not in key):  # (a search path may add groups too)
            value = override.value()
            if searched:
                composing.append(argument)  # an unknown choice fails the composition below: Hydra says why
            elif not override.is_delete() and isinstance(value, str) and value not in choices[key]:
                hint = did_you_mean(value, choices[key]) or f"choose {', '.join(choices[key])}"
                problems.append(f"{argument}: no such {key} config in conf/{key}/ ({hint})")
            elif key == "experiment" and not (override.is_add() or override.is_force_add() or override.is_delete()):
                problems.append(f"{argument}: an experiment is added to the defaults, write +{argument}")
            else:
                composing.append(argument)
        else:
            values.append((override, argument))
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="pretrain"):
            cfg = compose(config_name="config", overrides=composing)
    except (HydraException, OmegaConfBaseException):
        if problems:
            raise OverrideError("; ".join(problems)) from None
        return CheckedOverrides(list(arguments), None)

    rewritten = {}
    for override, argument in values:
        if override.is_delete():
            continue
        problem = _key_problem(cfg, override.key_or_group)
        if problem:
            problems.append(problem)
        elif not override.is_add() and not override.is_force_add() and not _exists(cfg, override.key_or_group) \
                and override.key_or_group.count(".") <= 1:
            rewritten[argument] = f"++{argument}"  # a valid key the config does not list yet
    if problems:
        raise OverrideError("; ".join(problems))

    result = [rewritten.get(a, a) for a in arguments]
    try:
        final = OverridesParser.create().parse_overrides([rewritten.get(a, a) for _, a in values])
        ConfigLoaderImpl._apply_overrides_to_config(final, cfg)
    except (HydraException, OmegaConfBaseException):
        return CheckedOverrides(result, None)  # e.g. +key on a key that is set, ~key on none: Hydra's message
    return CheckedOverrides(result, cfg)

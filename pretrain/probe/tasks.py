"""Task files: a small YAML naming the data files and columns, read with ``datasets``' local loaders.

A task file::

    name: zh_sentiment
    type: classification          # classification | regression | token_classification
    train: train.jsonl            # jsonl, json, csv, tsv, or a directory written by Dataset.save_to_disk
    dev: dev.jsonl
    test: test.jsonl              # optional
    text: text                    # classification/regression: the text column
    text_pair: null               # optional second text (sentence-pair tasks)
    label: label                  # classification/regression: the target column
    tokens: tokens                # token_classification: a list of words per row
    tags: tags                    # token_classification: a list of BIO tags per row, one per word
    labels: [neg, pos]            # optional: the label list (else the sorted labels of the training split)
    metric: accuracy              # optional: the headline metric (see metrics.METRICS)

The tasks that ship with the package are the Hydra config group ``probe/`` (``pretrain/conf/probe/``, linked as
``conf/probe/``): ``--task NAME`` reads ``conf/probe/NAME.yaml``; any other task is given by its path. A data path in a
task file is one of

- ``pkg://PACKAGE/PATH``: a file inside an installed Python package (the bundled slices are
  ``pkg://pretrain.probe/samples/...``), found wherever the package is installed;
- an absolute path, or ``~/...``;
- a relative path: read from the task file's own directory (not the working directory).

Values may use OmegaConf's interpolations, as the rest of ``conf/`` does: ``${oc.env:PROBE_DATA}/zh_ner/train.jsonl``
reads the folder from the environment. Every problem is a :class:`TaskError` whose message names the file and says
what to fix; nothing here is trusted beyond what it checks.
"""

from __future__ import annotations

import importlib.resources
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pretrain.model.task_heads import TASK_TYPES
from pretrain.probe.metrics import DEFAULT_METRIC, METRICS

SPLITS = ("train", "dev", "test")
_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv"}
GROUP = Path(__file__).resolve().parents[1] / "conf" / "probe"  # the ``probe/`` config group
PACKAGE_PREFIX = "pkg://"
_KEYS = {"name", "type", "train", "dev", "test", "text", "text_pair", "label", "tokens", "tags", "labels", "metric"}


class TaskError(ValueError):
    """A task file or data file that cannot be used as described; the message names the file and the fix."""


@dataclass
class TaskSpec:
    name: str
    type: str
    files: dict[str, Path]  # split -> data file or save_to_disk directory
    source: Path  # the task file
    text: str = "text"
    text_pair: str | None = None
    label: str = "label"
    tokens: str = "tokens"
    tags: str = "tags"
    labels: list[str] | None = None
    metric: str = ""

    @property
    def columns(self) -> list[str]:
        if self.type == "token_classification":
            return [self.tokens, self.tags]
        return [self.text] + ([self.text_pair] if self.text_pair else []) + [self.label]


@dataclass
class Task:
    """A task's rows in a normal form: ``text``/``text_pair``/``label`` (an id, or a float for regression) or
    ``tokens``/``tags`` (ids), and the ordered label list the ids index."""

    spec: TaskSpec
    labels: list[str]
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name


def group_tasks() -> list[str]:
    """The names ``--task`` accepts without a path: the files of the ``probe/`` config group."""
    return sorted(p.stem for p in GROUP.glob("*.yaml"))


def task_file(argument: str) -> Path:
    """The task file ``--task ARGUMENT`` names: a path (``.yaml``/``.yml``, or with a directory in it), else the
    ``probe/`` group's ``ARGUMENT.yaml``, else an existing file of that name."""
    path = Path(argument)
    if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        return path
    member = GROUP / f"{argument}.yaml"
    if member.is_file():
        return member
    if path.is_file():
        return path
    from data_prep.errors import did_you_mean

    hint = did_you_mean(argument, group_tasks()) or f"choose {', '.join(group_tasks())}"
    raise TaskError(f"{argument}: no such task file, and no such task in the probe/ config group ({GROUP}; {hint}); "
                    "pass a task YAML's path or a task name")


def _resolved(raw: dict[str, Any], source: Path) -> dict[str, Any]:
    """``raw`` with OmegaConf interpolations (``${oc.env:NAME}``) resolved, each failure named by its key."""
    if not any("${" in str(v) for v in raw.values()):
        return raw
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        conf = OmegaConf.create(raw)
    except OmegaConfBaseException as err:
        raise TaskError(f"{source}: {str(err).splitlines()[0]}; fix the task file") from None
    out = {}
    for key in raw:
        try:
            value = conf[key]
            out[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        except OmegaConfBaseException as err:
            # 'KeyError raised while resolving interpolation: "Environment variable 'X' not found"' -> the quote
            reason = re.sub(r"^\w+ raised while resolving interpolation: ", "", str(err).splitlines()[0]).strip('"')
            raise TaskError(f"{source}: '{key}' = {raw[key]!r}: {reason}; set it, or write the value in the task "
                            "file") from None
    return out


def data_path(value: str, source: Path) -> Path:
    """Where a task file's data path points (see the module docstring): ``pkg://PACKAGE/PATH``, absolute or ``~``,
    or relative to the task file's directory."""
    if value.startswith(PACKAGE_PREFIX):
        package, _, inside = value[len(PACKAGE_PREFIX):].partition("/")
        try:
            root = importlib.resources.files(package)
        except (ModuleNotFoundError, TypeError, ValueError):
            raise TaskError(f"{source}: {value}: no installed Python package {package!r}; write "
                            "pkg://PACKAGE/PATH with an importable package, or a file path") from None
        return Path(str(root)) / inside
    path = Path(value).expanduser()
    return path if path.is_absolute() else source.parent / path


def load_spec(path: str | os.PathLike) -> TaskSpec:
    source = Path(path)
    try:
        raw = yaml.safe_load(source.read_text(encoding="utf-8"))
    except OSError as err:
        raise TaskError(f"{source}: cannot read the task file ({err.strerror}); pass an existing task YAML") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise TaskError(f"{source}: not a valid YAML task file{at}; fix the syntax (see pretrain/probe/tasks.py "
                        "for the format)") from None
    if not isinstance(raw, dict):
        raise TaskError(f"{source}: a task file is a YAML mapping with keys name, type, train, dev, ...; got "
                        f"{type(raw).__name__}")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise TaskError(f"{source}: unknown key(s) {unknown}; allowed: {sorted(_KEYS)}")
    raw = _resolved(raw, source)
    for key in ("type", "train", "dev"):
        if not raw.get(key):
            raise TaskError(f"{source}: key '{key}' is missing; add it (type: one of {', '.join(TASK_TYPES)}; "
                            "train/dev: data files)")
    if raw["type"] not in TASK_TYPES:
        raise TaskError(f"{source}: type {raw['type']!r} is not one of {', '.join(TASK_TYPES)}")
    metric = str(raw.get("metric") or DEFAULT_METRIC[raw["type"]])
    if metric not in METRICS[raw["type"]]:
        raise TaskError(f"{source}: metric {metric!r} is not computed for {raw['type']} tasks; use one of "
                        f"{', '.join(METRICS[raw['type']])}")
    labels = raw.get("labels")
    if labels is not None and (not isinstance(labels, list) or len(labels) < 2):
        raise TaskError(f"{source}: 'labels' must be a list of at least two labels, got {labels!r}")
    files = {split: data_path(str(raw[split]), source) for split in SPLITS if raw.get(split)}
    strings = {k: str(raw[k]) for k in ("text", "label", "tokens", "tags") if raw.get(k)}
    return TaskSpec(name=str(raw.get("name") or source.stem), type=raw["type"], files=files, source=source,
                    text_pair=str(raw["text_pair"]) if raw.get("text_pair") else None,
                    labels=[str(x) for x in labels] if labels else None, metric=metric, **strings)


def read_split(path: Path, columns: list[str]) -> list[dict[str, Any]]:
    """The rows of one data file (only ``columns``), read by ``datasets``."""
    import datasets

    if not path.exists():
        raise TaskError(f"{path}: no such file; fix the path in the task file (relative paths start at its directory)")
    if path.is_dir():
        try:
            data = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError, OSError) as err:
            raise TaskError(f"{path}: not a dataset written by save_to_disk ({err}); pass a jsonl/csv/tsv file or a "
                            "saved Dataset") from None
        if isinstance(data, datasets.DatasetDict):
            raise TaskError(f"{path}: holds a DatasetDict with splits {sorted(data)}; name one split's directory "
                            f"(e.g. {path / next(iter(data))})")
    else:
        builder = _FORMATS.get(path.suffix.lower())
        if builder is None:
            raise TaskError(f"{path}: unknown format '{path.suffix}'; use .jsonl, .json, .csv, .tsv or a save_to_disk "
                            "directory")
        if path.stat().st_size == 0:
            raise TaskError(f"{path}: the file is empty; fill it or point the task file at the right file")
        options = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        datasets.disable_progress_bars()
        try:
            data = datasets.load_dataset(builder, data_files=str(path), split="train", **options)
        except Exception as err:  # datasets raises many kinds (DatasetGenerationError, ArrowInvalid, ...)
            reason = str(err.__cause__ or err).splitlines()[0][:200]
            raise TaskError(f"{path}: cannot be read as {path.suffix} ({reason}); fix the file") from None
    if len(data) == 0:
        raise TaskError(f"{path}: has no rows; fill it or point the task file at the right file")
    missing = [c for c in columns if c not in data.column_names]
    if missing:
        raise TaskError(f"{path}: column(s) {missing} not found (columns: {data.column_names}); rename them in the "
                        "file or set text/text_pair/label/tokens/tags in the task file")
    return data.select_columns(columns).to_list()


def load_task(spec_or_path: TaskSpec | str | os.PathLike) -> Task:
    """Read and check every split of a task; map string labels to ids (train's sorted labels unless given)."""
    spec = spec_or_path if isinstance(spec_or_path, TaskSpec) else load_spec(spec_or_path)
    raw = {split: read_split(path, spec.columns) for split, path in spec.files.items()}
    if spec.type == "regression":
        labels: list[str] = []
    elif spec.labels:
        labels = spec.labels
    else:
        labels = _infer_labels(spec, raw["train"])
    task = Task(spec, labels)
    for split, rows in raw.items():
        task.rows[split] = [_normal_row(spec, labels, row, spec.files[split], i) for i, row in enumerate(rows)]
    return task


def _label_key(value: Any) -> tuple:
    return (0, float(value), "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0.0, str(value))


def _infer_labels(spec: TaskSpec, rows: list[dict[str, Any]]) -> list[str]:
    if spec.type == "token_classification":
        values = {tag for row in rows for tag in (row[spec.tags] or [])}
        ordered = sorted(values, key=lambda t: (t != "O", str(t)[2:], str(t)))  # O first, then B-X before I-X
        labels = [str(v) for v in ordered]
    else:
        values = {row[spec.label] for row in rows if row[spec.label] is not None}
        labels = [str(v) for v in sorted(values, key=_label_key)]
    if len(labels) < 2:
        raise TaskError(f"{spec.files['train']}: the training split has {len(labels)} distinct label(s) {labels}; "
                        "a classifier needs at least two")
    return labels


def _normal_row(spec: TaskSpec, labels: list[str], row: dict[str, Any], path: Path, index: int) -> dict[str, Any]:
    where = f"{path}: row {index + 1}"
    ids = {name: i for i, name in enumerate(labels)}
    if spec.type == "token_classification":
        tokens, tags = row[spec.tokens], row[spec.tags]
        if not isinstance(tokens, list) or not isinstance(tags, list) or len(tokens) != len(tags):
            raise TaskError(f"{where}: '{spec.tokens}' and '{spec.tags}' must be lists of equal length; fix the row")
        unknown = [t for t in tags if str(t) not in ids]
        if unknown:
            raise TaskError(f"{where}: tag {unknown[0]!r} is not in the label list {labels}; add it to 'labels' in "
                            f"{spec.source} or fix the row")
        return {"tokens": [str(t) for t in tokens], "tags": [ids[str(t)] for t in tags]}
    out: dict[str, Any] = {"text": _text(row[spec.text], where, spec.text)}
    if spec.text_pair:
        out["text_pair"] = _text(row[spec.text_pair], where, spec.text_pair)
    value = row[spec.label]
    if spec.type == "regression":
        try:
            out["label"] = float(value)
        except (TypeError, ValueError):
            raise TaskError(f"{where}: '{spec.label}' = {value!r} is not a number; a regression target must be "
                            "numeric") from None
    else:
        if value is None or str(value) not in ids:
            raise TaskError(f"{where}: label {value!r} is not in the label list {labels}; add it to 'labels' in "
                            f"{spec.source} or fix the row")
        out["label"] = ids[str(value)]
    return out


def _text(value: Any, where: str, column: str) -> str:
    if not isinstance(value, str):
        raise TaskError(f"{where}: '{column}' = {value!r} is not a text; fix the row or name the text column in the "
                        "task file")
    return value

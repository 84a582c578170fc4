"""Hold out a validation split by document: which documents go to the validation shards.

Why by a hash of the text: the choice must not depend on the order of the inputs, on ``--workers`` or on how the
corpus is cut into files, and a document that occurs twice must land on the same side (no copy of a validation
document in the training set). A document is held out when the first 8 bytes of the BLAKE2b digest of its text
(UTF-8, after the corpus normalisation), read as a fraction of 2**64, are below ``val_fraction``. About
``val_fraction`` of the documents (not of the tokens) are held out; the manifests record the rule and the fraction.
"""

from __future__ import annotations

import hashlib

from data_prep.errors import DataPrepError

RULE = "blake2b-64(utf-8 document text) / 2**64 < val_fraction"
VAL_SUBDIR = "val"
"""Default place of the validation shards: ``OUT/val`` next to the training shards' files."""


def check_fraction(fraction: float) -> float:
    if not 0.0 < fraction < 1.0:
        raise DataPrepError(f"--val-fraction {fraction}: must be between 0 and 1 (exclusive), e.g. 0.05 holds out "
                            "about 5% of the documents")
    return fraction


def is_held_out(text: str, fraction: float) -> bool:
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


def record(fraction: float, part: str) -> dict:
    """The manifest entry (``settings.split``) of one side of the split."""
    if part not in ("train", "val"):
        raise ValueError(f"part={part!r}: 'train' or 'val'")
    return {"part": part, "val_fraction": fraction, "rule": RULE}


def keeps(text: str, split: dict | None) -> bool:
    """Whether a document belongs to the shard set whose ``settings.split`` is ``split`` (None: no split)."""
    if split is None:
        return True
    return is_held_out(text, split["val_fraction"]) == (split["part"] == "val")

"""``data_prep.cli_errors``: the one ``error:`` line every command ends with on a fault the user can act on."""

from __future__ import annotations

import errno

import pytest

from data_prep.cli_errors import one_line_errors
from data_prep.errors import DataPrepError


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_a_project_error_is_one_line_and_status_2(capsys):
    with one_line_errors(DataPrepError) as outcome:
        raise DataPrepError("shards/manifest.json: no 'seq_len'; re-pack the shards")
    assert outcome.status == 2
    assert _error_lines(capsys) == ["error: shards/manifest.json: no 'seq_len'; re-pack the shards"]


def test_an_error_re_raised_from_a_data_loader_worker_keeps_only_its_own_message(capsys):
    """A DataLoader worker's error arrives with the worker's whole traceback in its text."""
    try:
        raise DataPrepError("shards/shard-00000.bin: 12 bytes short; re-pack the shards")
    except DataPrepError as inner:
        import traceback

        worker_text = ("Caught DataPrepError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                       "last):\n" + "".join(traceback.format_exception(inner)).replace("DataPrepError",
                                                                                       "data_prep.errors.DataPrepError"))
    with one_line_errors(DataPrepError) as outcome:
        raise DataPrepError(worker_text)
    assert outcome.status == 2
    assert _error_lines(capsys) == ["error: shards/shard-00000.bin: 12 bytes short; re-pack the shards"]


def test_a_full_disk_names_the_path_and_the_disk_full_advice(tmp_path, capsys):
    with one_line_errors(where=tmp_path, hint="check the path", disk_full_hint="free space there") as outcome:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "shard.bin"))
    with one_line_errors(where=tmp_path, hint="check the path", disk_full_hint="free space there"):
        raise PermissionError(errno.EACCES, "Permission denied")  # names no file: the command's own path
    assert outcome.status == 2
    assert _error_lines(capsys) == [f"error: {tmp_path / 'shard.bin'}: No space left on device; free space there",
                                    f"error: {tmp_path}: Permission denied; check the path"]


def test_a_bug_keeps_its_traceback_and_exit_on_error_exits_2(capsys):
    with pytest.raises(KeyError):
        with one_line_errors(DataPrepError):
            raise KeyError("a bug")
    assert _error_lines(capsys) == []
    with pytest.raises(SystemExit) as stop:
        with one_line_errors(DataPrepError) as outcome:
            raise DataPrepError("bad input")
        outcome.exit_on_error()
    assert stop.value.code == 2
    with one_line_errors(DataPrepError) as fine:
        pass
    fine.exit_on_error()  # nothing failed: no exit
    assert fine.status == 0

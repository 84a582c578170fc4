"""Every command's way of ending on a fault the user can act on: one ``error: ...`` line on stderr, exit status 2.

``python -m data_prep``, ``python -m pretrain`` and its other commands (cool-down, export, reshard, report, probe)
run their main body inside :class:`one_line_errors`: the project's own error types (bad settings, shards,
checkpoints...) print their message as it is; an ``OSError`` (a full disk, a quota, a permission, a missing path)
prints the path, the system's reason and what to do, so the same fault reads the same in every command. Anything
else is a bug and keeps its traceback. It lives in ``data_prep`` because both packages' commands use it and
``data_prep`` imports nothing of ``pretrain``; it imports nothing heavy, so a command can use it before torch loads.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from types import TracebackType
from typing import NoReturn

STATUS = 2  # the exit status of an error the user can act on (argparse's too)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def message_of(err: BaseException) -> str:
    """The error's message; for one re-raised from a DataLoader worker (its text holds the worker's whole
    traceback), only the original exception's own message."""
    message = str(err)
    if "Original Traceback" in message:
        last = [line for line in message.splitlines() if line.strip()][-1]
        message = last.split(": ", 1)[1] if last.startswith(("data_prep.", "pretrain.")) else last
    return message


def os_error_line(err: OSError, where: str | Path | None, hint: str, disk_full_hint: str | None = None) -> str:
    """``PATH: reason; what to do``: the file the system names (else ``where``), and ``disk_full_hint`` for a full
    disk or quota (else ``hint``)."""
    place = err.filename or where
    advice = disk_full_hint if disk_full_hint and err.errno in DISK_FULL else hint
    return f"{str(place) + ': ' if place else ''}{err.strerror or err}; {advice}"


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on stderr and exit with status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(STATUS)


class one_line_errors:  # noqa: N801 (used as a statement: ``with one_line_errors(...) as outcome:``)
    """Run the ``with`` body; an error of ``kinds`` or an ``OSError`` prints one line and is swallowed, leaving
    ``status`` at 2 (else 0). A command that returns its status returns it after the block; one that exits calls
    :meth:`exit_on_error`. ``hint``/``disk_full_hint``: what to do after an ``OSError`` (see :func:`os_error_line`);
    ``where``: the path to name when the error names none."""

    def __init__(self, *kinds: type[BaseException], where: str | Path | None = None,
                 hint: str = "check the path and its permissions, then run the command again",
                 disk_full_hint: str | None = None):
        self.kinds, self.where, self.hint, self.disk_full_hint = kinds, where, hint, disk_full_hint
        self.status = 0

    def __enter__(self) -> one_line_errors:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 traceback: TracebackType | None) -> bool:
        if err is None:
            return False
        if isinstance(err, self.kinds):
            message = message_of(err)
        elif isinstance(err, OSError):
            message = os_error_line(err, self.where, self.hint, self.disk_full_hint)
        else:
            return False
        print(f"error: {message}", file=sys.stderr, flush=True)
        self.status = STATUS
        return True

    def exit_on_error(self) -> None:
        """Exit with the status when the block failed."""
        if self.status:
            sys.exit(self.status)

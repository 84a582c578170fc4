"""Time the README's newcomer path as written: a fresh clone, then every command of "Your first hour" in order.

Why: the README promises that its first-hour path (install, `make quickstart`, own data with v3 and v2, a CPU-sized
continued pretraining, the report) runs start to finish on a 2-core CPU machine in minutes. This script runs exactly
the commands in the README's code blocks (nothing retyped), in one shell so that `. .venv/bin/activate` and
variables carry over, and prints the wall time of each command with the load average around it, so the figures
quoted in the README can be measured again on any machine.

    python bench/newcomer_path.py [--workdir /tmp/newcomer] [--nice 5]

The clone is of the repository's HEAD commit (commit the README first). `--nice N` runs the path under `nice -n N`
(a measurement beside other work); the README's commands themselves are unchanged.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def newcomer_commands(readme: str) -> list[str]:
    """The shell commands of "Your first hour", in order; `make quickstart` (Quick start) follows the install."""
    start, end = readme.index("## Your first hour"), readme.index("\n## ", readme.index("## Your first hour") + 3)
    commands: list[str] = []
    for section in re.split(r"\n### ", readme[start:end])[1:]:
        for block in re.findall(r"```bash\n(.*?)```", section, re.S):
            commands += _split_commands(block)
        if section.startswith("1."):
            commands.append("make quickstart")
    return commands


def _split_commands(block: str) -> list[str]:
    """One entry per command: backslash-continued lines and multi-line quoted assignments joined."""
    commands, current = [], ""
    for line in block.splitlines():
        current = f"{current}\n{line}" if current else line
        if current.endswith("\\") or current.count('"') % 2:
            continue
        if current.strip():
            commands.append(current)
        current = ""
    return commands


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/newcomer"), help="where the clone is made (replaced)")
    parser.add_argument("--nice", type=int, default=0, help="run the path under nice -n N (default 0)")
    args = parser.parse_args(argv)

    clone = args.workdir / "deberta-pretrain"
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    commands = newcomer_commands((clone / "README.md").read_text(encoding="utf-8"))

    marks = args.workdir / "marks"
    script = ["set -e"]
    for i, command in enumerate(commands):
        script += [f'echo "{i} start $(date +%s.%N) $(cut -d" " -f1 /proc/loadavg)" >> {marks}', command,
                   f'echo "{i} end $(date +%s.%N) $(cut -d" " -f1 /proc/loadavg)" >> {marks}']
    (args.workdir / "path.sh").write_text("\n".join(script) + "\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    with open(args.workdir / "path.log", "w") as log:
        started = time.time()
        rc = subprocess.run(["nice", "-n", str(args.nice), "bash", str(args.workdir / "path.sh")], cwd=clone,
                            env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        total = time.time() - started

    times: dict[int, dict[str, tuple[float, str]]] = {}
    for line in marks.read_text().splitlines():
        index, kind, stamp, load = line.split()
        times.setdefault(int(index), {})[kind] = (float(stamp), load)
    for i, command in enumerate(commands):
        mark = times.get(i, {})
        if "start" in mark and "end" in mark:
            took = f"{mark['end'][0] - mark['start'][0]:7.1f} s  load {mark['start'][1]} -> {mark['end'][1]}"
        else:
            took = "   failed" if "start" in mark else "  not run"
        print(f"{took}  {' '.join(command.replace(chr(92) + chr(10), ' ').split())}")
    print(f"total {total:.0f} s ({total / 60:.1f} min), exit status {rc}; output in {args.workdir / 'path.log'}")
    sys.exit(rc)


if __name__ == "__main__":
    main()

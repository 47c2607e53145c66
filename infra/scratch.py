"""Scratch folders that name their owner process, so that a later process can sweep those
of processes that died without cleaning up (a SIGKILLed worker or stitcher runs no
`finally`, no atexit).

A folder is `{prefix}{pid}-{start}-{random}` in the temp directory (or `parent`), where
`start` is the process's start time from /proc: a pid alone is reused, pid and start time
together name one process for as long as the machine is up.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile

_OWNER = re.compile(r"^(\d+)-(\d+)-")


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if there is no such process
    (or no /proc to ask, where 0 stands in: owners are then told apart by pid alone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        if not os.path.isdir("/proc/self"):
            return 0 if _pid_alive(pid) else None
        return None
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    fields = stat[stat.rindex(b")") + 2:].split()
    return int(fields[19])  # field 22 of proc(5), counted from field 3


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_scratch(prefix: str, parent: str | None = None) -> str:
    """A new scratch folder owned by this process (see the module's note)."""
    pid = os.getpid()
    return tempfile.mkdtemp(prefix=f"{prefix}{pid}-{process_start(pid)}-", dir=parent)


def owner_alive(name: str, prefix: str) -> bool:
    """Whether the process a scratch folder's name names is still running. Names that do
    not carry an owner (older releases, other programs) count as alive: never swept."""
    m = _OWNER.match(name[len(prefix):]) if name.startswith(prefix) else None
    if m is None:
        return True
    pid, start = int(m.group(1)), int(m.group(2))
    return process_start(pid) == start


def sweep_stale(prefix: str, parent: str | None = None) -> list[str]:
    """Remove scratch folders of `prefix` whose owner process is gone; returns their paths."""
    parent = parent or tempfile.gettempdir()
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    removed = []
    for name in names:
        path = os.path.join(parent, name)
        if name.startswith(prefix) and not owner_alive(name, prefix) and os.path.isdir(path) \
                and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed

"""A worker's start-up, phase by phase: what a job waits for before its first shard decodes.

A cold GPU worker spends most of a short job starting (DESIGN.md: 23.9 s before the first
shard of a 42.3 s job, compiling adds about 23 s more): imports, CUDA, weights, compiling
or loading compiled code, the first decode steps (cuDNN autotune). Each worker records those
phases with wall-clock times (`time.time()`, comparable with the driver's clock on the same
host, and across hosts as far as their clocks agree) and hands them back, so that the job's
timeline draws them before the first shard and its summary says what they cost.

Pure: no torch, no Ray (`BackgroundImport` imports modules by name, on a thread); the
worker and its Ray wrapper fill it in.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

log = logging.getLogger("framefarm")

# What a worker did about compiled code for one decoder (`StartupReport.compile`).
COMPILE_OFF = "off"  # the decoder runs eagerly by choice (its options, or the device's default)
COMPILE_MISS = "compiled"  # compiled here: no usable cache, or the cache was stale
COMPILE_HIT = "cache-hit"  # every compiled graph came from the compile cache
COMPILE_FAILED = "eager-fallback"  # compiling raised: the worker decodes eagerly instead


@dataclass(frozen=True)
class Phase:
    """One step of a worker's start-up, [start, end) in seconds since the epoch."""

    name: str
    start: float
    end: float
    detail: str = ""

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass
class StartupReport:
    """A worker's start-up: its phases in order, and what it did about compiled code.

    Phases from the worker process (`process`, `imports`, `device`, and on a thread of its
    own `compiler-import`) come once per worker; those of a decoder (`weights`,
    `compiler-import-wait`, `compile-cache-load`, `first-step`, `compile` or `warm-up`,
    `compiled-steps`, `graph-capture`, `compile-cache-save`) once per decoder spec and frame
    size the worker prepares.
    """

    phases: list[Phase] = field(default_factory=list)
    compile: str = COMPILE_OFF
    compile_error: str | None = None  # why compiling failed, for COMPILE_FAILED
    compile_cache: str | None = None  # the object the worker read or wrote, if any

    @property
    def started(self) -> float | None:
        return min((p.start for p in self.phases), default=None)

    @property
    def ended(self) -> float | None:
        return max((p.end for p in self.phases), default=None)

    def seconds(self, name: str) -> float:
        """Total time in phases called `name` (0 if none)."""
        return sum(p.seconds for p in self.phases if p.name == name)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> StartupReport:
        return cls(phases=[Phase(**p) for p in d.get("phases", [])], compile=d.get("compile", COMPILE_OFF),
                   compile_error=d.get("compile_error"), compile_cache=d.get("compile_cache"))


class StartupClock:
    """Records phases as they happen; `with clock.phase("weights"): ...`."""

    def __init__(self, phases: list[Phase] | None = None):
        self.phases: list[Phase] = list(phases or [])

    def add(self, name: str, start: float, end: float, detail: str = "") -> None:
        self.phases.append(Phase(name, start, end, detail))

    @contextmanager
    def phase(self, name: str, detail: str = "") -> Iterator[None]:
        """Times the block; a phase that raises is recorded too (named `name (failed)`)."""
        start = time.time()
        try:
            yield
        except BaseException:
            self.add(f"{name} (failed)", start, time.time(), detail)
            raise
        self.add(name, start, time.time(), detail)


def process_started_at() -> float | None:
    """When this process started (seconds since the epoch), from Linux's /proc; None elsewhere.

    /proc/self/stat's field 22 is the start in clock ticks after boot; /proc/uptime says how
    long ago the boot was, to 10 ms (/proc/stat's btime has whole seconds only).
    """
    try:
        now = time.time()
        with open("/proc/self/stat") as f:
            # The command name (field 2) may hold spaces: split after its closing parenthesis.
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return now - uptime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


# What a compiling worker imports before its first compile: dynamo (6.8 s of a cold H200
# worker's imports) and inductor's compiler front (about as much again: 1.5 s and 2.1 s on
# a warm 2-core machine). A worker that never compiles never imports them.
COMPILER_MODULES = ("torch._dynamo", "torch._inductor.compile_fx")


class BackgroundImport:
    """Imports modules on a thread of their own, so that a worker's other start-up work
    (CUDA, weights, the compile cache) overlaps them; `wait()` before using them.

    Importing the same modules on the main thread later is safe either way: Python's
    per-module import locks make it wait for, or reuse, the thread's work. An import that
    fails here is logged and left to fail again, with its real traceback, where it is used.
    The thread's span is recorded as the phase `name` (it overlaps the main thread's phases).
    """

    def __init__(self, modules: Sequence[str], clock: StartupClock, name: str = "compiler-import"):
        self.modules, self.clock, self.name = tuple(modules), clock, name
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the imports (once; later calls do nothing)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"framefarm-{self.name}", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        start = time.time()
        failed = None
        for module in self.modules:
            try:
                importlib.import_module(module)
            except Exception as exc:  # noqa: BLE001 - re-raised where the module is used
                failed = f"{module}: {type(exc).__name__}: {exc}"
                log.warning("background import of %s failed (%s)", module, failed)
                break
        self.clock.add(self.name if failed is None else f"{self.name} (failed)", start, time.time(),
                       "background thread" + ("" if failed is None else f"; {failed}"))

    def wait(self, timeout_s: float = 600.0) -> None:
        """Block until the imports are done (started here if they were not yet)."""
        self.start()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"importing {', '.join(self.modules)} took more than {timeout_s:.0f} s")

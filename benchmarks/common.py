"""What every benchmark script shares: options, the machine's description, timing, JSON, tables.

Each script is run as `python -m benchmarks.NAME`, prints a table, and writes every number
as JSON (--json PATH; --out is the older spelling) after every row, so that a run cut short
by a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from infra.staged import write_file


def parser(name: str, doc: str | None, json_default: str) -> argparse.ArgumentParser:
    """An argument parser for `python -m benchmarks.NAME`: the module docstring as help, --json."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", "--out", dest="json", default=json_default, metavar="PATH",
                   help=f"where the results go as JSON (default: {json_default})")
    return p


def parse_size(text: str) -> tuple[int, int]:
    """'1280x720' -> (1280, 720)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a frame size is WIDTHxHEIGHT, got {text!r}") from None
    if width <= 0 or height <= 0:
        raise argparse.ArgumentTypeError(f"bad frame size {text!r}")
    return width, height


def parse_list(text: str, kind: Callable = str) -> list:
    """'a,b,c' -> [kind('a'), kind('b'), kind('c')]."""
    return [kind(v) for v in text.split(",") if v]


def device_name(device: torch.device | str) -> str:
    """The card's name for a CUDA device, else the CPU's model."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cores() -> int:
    """CPU cores this process may run on (`taskset` narrows it), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine(device: torch.device | str = "cpu") -> dict:
    """Where a result was measured: enough to compare two result files."""
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(), "device": str(device),
            "device_name": device_name(device), "cores": cores(), "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0], "torch": torch.__version__}


def write_json(path: str, data) -> None:
    """Write `data` as JSON to `path`, whole or not at all."""
    write_file(path, lambda f: f.write(json.dumps(data, indent=2, default=str).encode() + b"\n"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


@contextmanager
def stopwatch(device: torch.device | None = None) -> Iterator[dict]:
    """Wall seconds of the block, with the device's queued work done at both ends: d['s']."""
    result: dict = {}
    if device is not None:
        sync(device)
    t0 = time.perf_counter()
    try:
        yield result
    finally:
        if device is not None:
            sync(device)
        result["s"] = time.perf_counter() - t0


def print_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]], indent: str = "  ") -> None:
    """Rows as a table; `columns`: (key, heading, format spec); a missing value prints '-'."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append([("-" if row.get(k) is None else format(row[k], spec)) for k, _, spec in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for r in cells:
        print(indent + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    sys.stdout.flush()

"""The driver side. `from cluster import render, submit, Farm` is the notebook API.

The API's names are resolved on first use: `import cluster.plan` (planning, no Ray) must
not pull Ray, the driver and the decoders in with it.
"""

from __future__ import annotations

import importlib

_API = ("Farm", "JobHandle", "JobResult", "connect", "render", "submit")

__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module("cluster.api"), name)
    raise AttributeError(f"module 'cluster' has no attribute {name!r}")

"""OUTPUT as a unit: one render's files become visible together, or not at all.

A render writes everything into a folder of its own, `OUTPUT/renders/<job>/`: the video
(`video.mp4`, `video.mkv` or `frames/`), manifest.parquet, summary.json, timeline.json, and
last `render.json`, which lists those files with their sizes. Nothing a reader looks at
changes while it does. Then one atomic step publishes the render:

- locally, the link `OUTPUT/renders/current` is swapped (a rename) to point at the new
  folder; `OUTPUT/video.mp4`, `OUTPUT/summary.json`, ... are links through it, so all of
  them change at once;
- on S3, `OUTPUT/render.json` (one PUT) names the render; its files are read under
  `renders/<job>/`.

Only then are the previous render's files deleted, by the list in its own render.json.
A crash before the swap leaves the previous render whole, after it the new one; what a
crash strands (a render folder nobody points at, temporary files, an unfinished S3
upload) is swept by the next job that holds OUTPUT's lease (`infra.lease`). Nothing is
deleted that framefarm did not write: removals go by framefarm's own names only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid

from infra.staged import TMP_SUFFIX
from infra.storage import ObjectStore, S3Store

log = logging.getLogger("framefarm")

RENDERS = "renders"
CURRENT = "current"  # local: renders/current -> <job>
RECORD = "render.json"
SIDE_FILES = ("manifest.parquet", "summary.json", "timeline.json")
VIDEO_NAMES = ("video.mp4", "video.mkv", "frames")
_RENDER_ID = re.compile(r"^[0-9a-f]{16}$")
_PNG = re.compile(r"^\d{6}\.png$")


class OutputConflict(RuntimeError):
    """OUTPUT holds something a render would replace that it may not."""


def render_prefix(job_id: str) -> str:
    return f"{RENDERS}/{job_id}"


def current_record(store: ObjectStore) -> dict | None:
    """The published render's record, or None if OUTPUT has none."""
    try:
        record = json.loads(store.get_bytes(RECORD))
    except FileNotFoundError:
        return None
    except ValueError:
        return None
    return record if isinstance(record, dict) and _RENDER_ID.match(str(record.get("job_id", ""))) else None


def is_whole(store: ObjectStore, record: dict) -> bool:
    """Whether every file the record lists is there with its size (through the views, locally:
    a user who deleted OUTPUT/video.mp4 has no whole render)."""
    for name, size in record["files"].items():
        key = name if store.local_path(name) is not None else f"{record['prefix']}/{name}"
        if name == "frames":
            if len([k for k in store.list(f"{key}/") if _PNG.match(k.rsplit("/", 1)[-1])]) != size:
                return False
        elif not store.exists(key) or store.size(key) != size:
            return False
    return True


def make_record(store: ObjectStore, job_id: str, video: str, frames: int) -> dict:
    """The record of a render whose files are all written under its prefix."""
    prefix = render_prefix(job_id)
    files = {}
    for name in (video, *SIDE_FILES):
        key = f"{prefix}/{name}"
        files[name] = frames if name == "frames" else store.size(key)
    return {"job_id": job_id, "prefix": prefix, "video": video, "frames": frames, "files": files,
            "published": time.time()}


def check_replaceable(store: ObjectStore) -> None:
    """Refuse when a name the views need holds something framefarm did not put there (a
    user's video.mp4, an older release's files): it would be replaced or deleted."""
    root = store.local_path(RECORD)
    if root is None:
        return
    root = os.path.dirname(root)
    foreign = [name for name in (*VIDEO_NAMES, *SIDE_FILES, RECORD)
               if os.path.lexists(os.path.join(root, name)) and not _is_view(root, name)]
    if foreign:
        raise OutputConflict(f"{root} already holds {', '.join(foreign)}, not written by this framefarm: "
                             "move them away or choose another OUTPUT")


def publish(store: ObjectStore, record: dict, previous: dict | None) -> None:
    """Make `record`'s render the one OUTPUT shows (one atomic step), then delete the
    previous render's files and the views the new one does not have."""
    data = json.dumps(record, indent=2).encode()
    store.put_bytes(f"{record['prefix']}/{RECORD}", data)
    local = store.local_path(RECORD)
    if local is None:
        store.put_bytes(RECORD, data)  # the commit point
    else:
        _swap_views(os.path.dirname(local), record)
    if previous is not None and previous["job_id"] != record["job_id"]:
        delete_render(store, previous)


def delete_render(store: ObjectStore, record: dict) -> None:
    """Delete a render's files by its record's list (and the record), nothing else."""
    prefix = record["prefix"]
    for name, size in record["files"].items():
        if name == "frames":
            for key in store.list(f"{prefix}/frames/"):
                if _PNG.match(key.rsplit("/", 1)[-1]):
                    store.delete(key)
        else:
            store.delete(f"{prefix}/{name}")
    store.delete(f"{prefix}/{RECORD}")


def sweep(store: ObjectStore, keep: set[str]) -> list[str]:
    """Remove what crashed runs left in OUTPUT: temporary files and folders (framefarm's
    suffix), render folders no record points at except `keep`'s, unfinished S3 uploads.
    Call only while holding OUTPUT's lease. Returns what was removed, for the log."""
    removed = []
    current = current_record(store)
    live = set(keep) | ({current["job_id"]} if current else set())
    local = store.local_path(RECORD)
    if local is not None:
        root = os.path.dirname(local)
        for dirpath, dirs, files in os.walk(root):
            for name in [d for d in dirs if d.endswith(TMP_SUFFIX)]:
                dirs.remove(name)
                _remove_tree_of_ours(os.path.join(dirpath, name))
                removed.append(os.path.join(dirpath, name))
            for name in files:
                if name.endswith(TMP_SUFFIX):
                    os.remove(os.path.join(dirpath, name))
                    removed.append(os.path.join(dirpath, name))
        # Views made for a render whose publication never happened point at nothing.
        shown = set(current["files"]) | {RECORD} if current else set()
        for name in (*VIDEO_NAMES, *SIDE_FILES, RECORD):
            if name not in shown and _is_view(root, name):
                os.remove(os.path.join(root, name))
                removed.append(os.path.join(root, name))
    for job_id in _render_ids(store):
        if job_id not in live:
            stale = _stale_record(store, job_id)
            delete_render(store, stale)
            removed.append(store.uri_for(stale["prefix"]))
    if isinstance(store, S3Store):
        removed += store.abort_uploads()
    return removed


def fsync_path(path: str) -> None:
    """Flush a folder's entries to the disk: a rename or new link survives a crash only then."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- local views ---------------------------------------------------------------------------


def _view_target(name: str) -> str:
    return os.path.join(RENDERS, CURRENT, name)


def _is_view(root: str, name: str) -> bool:
    path = os.path.join(root, name)
    return os.path.islink(path) and os.readlink(path) == _view_target(name)


def _swap_views(root: str, record: dict) -> None:
    renders = os.path.join(root, RENDERS)
    names = [record["video"], *SIDE_FILES, RECORD]
    # Views first, through `current`: a new one (video.mkv after video.mp4) points at nothing
    # until the swap, so no reader sees anything of the new render before it.
    for name in names:
        if not os.path.lexists(os.path.join(root, name)):
            os.symlink(_view_target(name), os.path.join(root, name))
    link = os.path.join(renders, f".{CURRENT}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")
    os.symlink(record["job_id"], link)
    os.replace(link, os.path.join(renders, CURRENT))  # the commit point
    fsync_path(renders)
    for name in (*VIDEO_NAMES, *SIDE_FILES, RECORD):
        if name not in names and _is_view(root, name):
            os.remove(os.path.join(root, name))
    fsync_path(root)


def _remove_tree_of_ours(path: str) -> None:
    """A temporary folder of framefarm's (a PNG output being written): its PNGs, then it;
    or a link being made (the next `current`)."""
    if os.path.islink(path):
        os.remove(path)
        return
    for name in os.listdir(path):
        if _PNG.match(name):
            os.remove(os.path.join(path, name))
    try:
        os.rmdir(path)
    except OSError:
        log.warning("left %s: it holds files framefarm did not write", path)


# -- stale renders ---------------------------------------------------------------------------


def _render_ids(store: ObjectStore) -> set[str]:
    ids = set()
    for key in store.list(f"{RENDERS}/"):
        parts = key.split("/")
        if len(parts) >= 3 and _RENDER_ID.match(parts[1]):
            ids.add(parts[1])
    return ids


def _stale_record(store: ObjectStore, job_id: str) -> dict:
    """What a render folder holds of framefarm's, whether or not its record was written."""
    prefix = render_prefix(job_id)
    names = {k.split("/", 2)[2] for k in store.list(f"{prefix}/")}
    files = {n: 0 for n in (*VIDEO_NAMES[:2], *SIDE_FILES) if n in names}
    if any(n.startswith("frames/") for n in names):
        files["frames"] = 0
    return {"job_id": job_id, "prefix": prefix, "files": files}

"""The render job on the driver: validate, plan, dispatch shards, retry, stitch, report.

Order of work in `RenderJob.run`, every step before the first dispatch able to fail
without writing anything:
  1. read and validate the latents (shape, dtype, values) against the decoder's geometry;
  2. plan shards with the decoder's receptive field as left context;
  3. find segments a previous run of the same job committed (resume);
  4. start workers and the stitcher, hand shards to free workers, retry those of lost workers,
     abandon stalled ones, back up the slowest at the end (all through a
     `cluster.dispatch.WorkerPool`: Ray's actors, the warm farm, or threads of this process);
  5. commit the video (stitcher), then manifest.parquet, summary.json, timeline.json.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import json
import logging
import os
import secrets
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from actors.stitcher import SegmentError
from actors.compile_cache import resolve_cache_uri, user_cache_dir
from actors.protocol import (InputError, LatentSlice, RenderSpec, SegmentRecord, SegmentTaken, Shard,
                             ShardWithdrawn, CLAIM_SUFFIX, run_key, segment_key, shard_task, sidecar_key)
from actors.startup import StartupClock
from cluster.dispatch import (Handle, JobCancelled, JobStitcher, RayPool, ShardFailed, StitcherLost, Worker,
                              WorkerLost, WorkerPool, resolve_workers)
from cluster.service import ServicePool
from cluster.geometry import decoder_geometry
from cluster.latents import read_latents, validate_latents
from cluster.plan import ShardPlan, plan_shards
from cluster.publish import (OutputConflict, check_replaceable, current_record, is_whole, make_record, publish,
                             render_prefix, sweep)
from cluster.report import busy_label, chrome_trace, manifest_parquet, manifest_rows, stage_label, summarize
from infra.checksum import BLOCK_BYTES, block_digest
from infra.lease import DEFAULT_TTL_S, Lease, LeaseHeld, LeaseLost, Renewer
from infra.storage import LocationError, check_access, open_store

log = logging.getLogger("framefarm")

# A running shard gets a backup copy on an idle worker (when no shard waits) once it has run
# this many times as long as the job's median shard: long enough that shards taking their
# usual time finish first, short enough that a stuck one is overtaken long before stall_s.
BACKUP_AFTER = 1.5


@dataclass
class JobResult:
    output: str
    manifest: list[dict]
    summary: dict
    plan: ShardPlan = field(repr=False, default=None)
    already_rendered: bool = False  # OUTPUT held this very job's render: nothing was done


@dataclass
class _Copy:
    """A shard handed to a worker and not yet back (a backup copy is a second one)."""

    shard: Shard
    attempt: int
    worker: Worker
    dispatched: float  # time.monotonic() at dispatch
    backup: bool = False
    steps: int | None = None  # its worker's decode-step count, as last heard
    moved: float = 0.0  # monotonic time that count last moved (or the dispatch)


class OutputBusy(InputError):
    """Another job (or this same job, started twice) is rendering into OUTPUT."""


def latents_digest(latents: torch.Tensor) -> str:
    """sha256 over shape, dtype and the sha256 of each 16 MiB of the data (infra.checksum's
    block digest), reading the tensor's memory in place: a long video's latents are hundreds
    of MB, and this runs before any shard starts."""
    t = latents.detach().to("cpu").contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy()
    return block_digest(str((tuple(t.shape), str(t.dtype))).encode(), data.size,
                        lambda offset: data[offset:offset + BLOCK_BYTES])


@dataclass(frozen=True)
class PreparedJob:
    """A job's input, read and checked (step 1), and what planning needs of it."""

    latents: torch.Tensor = field(repr=False)  # CTHW, validated
    context: int  # latent frames of left context each shard decodes before its own
    # What that context costs to decode, in steady latent frames' worth (None: decoded in full).
    context_cost: float | None
    fingerprint: str  # what makes two runs' segments interchangeable; the job's id


def prepare(spec: RenderSpec, latents: torch.Tensor | None = None) -> PreparedJob:
    """Step 1, no Ray: read and validate the input, find the context shards need."""
    # Credentials and permissions too: without them the job would fail only once the workers
    # had started and decoded (or, for weights, loaded) something.
    check_access(spec.output, write=True)
    for uri in (spec.latents if latents is None else None, spec.decoder.weights):
        if uri:
            check_access(uri)
    check_output(spec.output)
    geometry = decoder_geometry(spec.decoder)
    if latents is None:
        if not spec.latents:
            raise InputError("no latents given: pass a file, an s3:// URI or a tensor")
        latents = read_latents(spec.latents)
    latents = validate_latents(latents, geometry.z_dim, spec.latents or "latents",
                               dtype=torch.bfloat16 if spec.decoder.dtype == "bf16" else torch.float32)
    context = geometry.receptive_field if spec.context == "exact" else spec.context
    if context < geometry.receptive_field:
        log.warning("context %d < the decoder's receptive field (%d latent frames): frames near each shard's "
                    "start will differ from a whole-video decode (context 'exact' keeps them identical)",
                    context, geometry.receptive_field)
    cost = None
    if spec.context_mode == "pruned":
        cost = geometry.context_cost(latents.shape[2], latents.shape[3], context)
    return PreparedJob(latents, context, cost, spec.fingerprint(latents_digest(latents)))


def check_output(uri: str) -> None:
    """A bad output URI, a missing bucket or an OUTPUT under a regular file fails here, before
    Ray starts, not after the decode (and then again on every retry)."""
    try:
        open_store(uri).check_location()
    except LocationError as exc:
        raise InputError(f"output {uri}: {exc}") from None


class RenderJob:
    def __init__(self, spec: RenderSpec, latents: torch.Tensor | None = None, *, pool: WorkerPool | None = None,
                 on_event: Callable[[str, dict], None] | None = None, progress: bool = True,
                 startup_timeout_s: float = 600.0, lease_ttl_s: float = DEFAULT_TTL_S, use_farm: bool = False):
        self.spec = spec
        self.use_farm = use_farm  # send shards to the warm farm (cluster.service) instead of own workers
        self.lease_ttl_s = lease_ttl_s
        self._lease: Lease | None = None
        self._renewer: Renewer | None = None
        self._lease_lost: BaseException | None = None
        self.stalled_shards = 0
        self.backup_shards = 0  # backup copies started
        self.backup_wins = 0  # shards whose backup copy committed first
        self._shard_seconds: list[float] = []  # dispatch to result, of this job's committed shards
        self._incidents: list[dict] = []  # stalls and backups, for the timeline
        self._previous: dict | None = None  # the render OUTPUT showed when this job took it
        self._already: dict | None = None  # this job's own render, already published whole
        self._latents = latents
        self.pool = pool
        self.on_event = on_event or (lambda kind, info: None)
        self.show_progress = progress
        self.startup_timeout_s = startup_timeout_s
        self.cancelled = threading.Event()
        self.frames_done = 0
        self.frames_total = 0
        self._prepared = None
        self._prepare_started: float | None = None
        self._clock = StartupClock()  # the driver's own steps before the first shard, for the timeline
        # Resolved here, where the job's output is known: workers of every node read the same one.
        self.compile_cache = resolve_cache_uri(spec.compile_cache, spec.output, user_cache_dir(dict(os.environ)))
        self._segments_folder: str | None = None
        self.job_id: str | None = None  # the fingerprint, once prepared
        self.run_id = secrets.token_hex(6)  # this run of it: its withdrawn copies, not a rerun's
        self.segments_committed = 0  # this job's segments in the output, reused ones included
        self.segments_total = 0

    def cancel(self):
        self.cancelled.set()

    def prepare(self) -> PreparedJob:
        """Read and validate the input (step 1) and take OUTPUT's lease; needs no Ray, so
        callers can fail fast. The lease is given back by `run` (or `release`)."""
        if self._prepared is None:
            self._prepare_started = time.time()  # the job's wall time counts reading its input
            with self._clock.phase("read + validate input"):
                prepared = prepare(self.spec, self._latents)
            with self._clock.phase("take OUTPUT's lease"):
                self._claim_output(prepared.fingerprint)
            self._prepared = prepared
            self.job_id = self._prepared.fingerprint
        return self._prepared

    def _claim_output(self, job_id: str) -> None:
        """This job's render already there: nothing to do. Else the lease, or a refusal
        naming who holds it; then a refusal to replace another job's render unless asked."""
        spec = self.spec
        store = open_store(spec.output)
        record = current_record(store)
        if record is not None and record["job_id"] == job_id and is_whole(store, record):
            self._already = record
            return
        try:
            check_replaceable(store)
        except OutputConflict as exc:
            raise InputError(str(exc)) from None
        try:
            lease = Lease.acquire(store, job_id, self.lease_ttl_s)
        except LeaseHeld as exc:
            if exc.holder.job == job_id:
                raise OutputBusy(f"job {job_id} is already running into {spec.output}: "
                                 f"{exc.holder.describe()}") from None
            raise OutputBusy(f"{spec.output} is busy: {exc}; wait for it or choose another OUTPUT") from None
        record = current_record(store)  # again, now that no one else can publish
        if record is not None and record["job_id"] != job_id and not spec.overwrite:
            lease.release()
            raise InputError(f"{spec.output} holds the render of job {record['job_id']} "
                             f"({record['frames']} frames); pass --overwrite (overwrite=True) to replace it")
        self._lease, self._previous = lease, record
        self._renewer = Renewer(lease, self._lose_lease)

    def _lose_lease(self, exc: BaseException) -> None:
        log.error("job stopping: %s", exc)
        self._lease_lost = exc
        self.cancelled.set()

    def release(self) -> None:
        """Give OUTPUT's lease back (run does this itself)."""
        if self._renewer is not None:
            self._renewer.stop()
            self._renewer = None
        if self._lease is not None:
            try:
                self._lease.release()
            except Exception as exc:  # noqa: BLE001 - it expires by itself
                log.warning("could not give back the lease on %s: %s", self.spec.output, exc)
            self._lease = None

    def run(self) -> JobResult:
        t_job = time.time()
        try:
            job = self.prepare()
            if self._already is not None:
                return self._already_rendered()
            t_job = min(t_job, self._prepare_started or t_job)  # prepared earlier (the CLI): from then
            own_pool = self.pool is None
            if own_pool and self.use_farm:
                with self._clock.phase("take a share of the farm"):
                    self.pool = ServicePool()
            elif own_pool:
                use_gpu, workers = resolve_workers(self.spec.device, self.spec.workers)
                self.pool = RayPool(workers, use_gpu)
            ok = False
            try:
                plan = plan_shards(job.latents.shape[1], self.pool.size, job.context, self.spec.shard_latents,
                                   job.context_cost)
                result = self._run(plan, job.latents, job.fingerprint, t_job)
                ok = True
                return result
            except JobCancelled:
                if self._lease_lost is not None:
                    raise self._lease_lost from None
                raise
            finally:
                if own_pool:
                    # Interrupted or failed: workers killed mid-shard leave partial files, removed
                    # once the workers are dead (a Farm's, replaced, are swept by the next run).
                    self.pool.shutdown(wait_s=0 if ok else 30)
                    self.pool = None
                    if not ok and self._segments_folder:
                        _discard_partial(self.spec.output, self._segments_folder)
                        # What a rerun will find: workers may have committed segments whose
                        # results this driver never received. A store that failed the job may
                        # fail this look too: the job's own error is the one to report.
                        try:
                            self.segments_committed = sum(
                                1 for key in open_store(self.spec.output).list(self._segments_folder + "/")
                                if key.endswith(".json"))
                        except Exception as exc:  # noqa: BLE001 - the count stays this driver's own
                            log.debug("could not count committed segments after a failure: %s", exc)
        finally:
            self.release()

    def _already_rendered(self) -> JobResult:
        record, store = self._already, open_store(self.spec.output)
        summary = json.loads(store.get_bytes(f"{record['prefix']}/summary.json"))
        log.info("job %s: already rendered in %s (%d frames); nothing to do", record["job_id"],
                 self.spec.output, record["frames"])
        self.frames_done = self.frames_total = record["frames"]
        return JobResult(output=self.spec.output, manifest=[], summary=summary, already_rendered=True)

    def _run(self, plan: ShardPlan, latents: torch.Tensor, job_id: str, t_job: float) -> JobResult:
        """Steps 3-5 of the module's list, on a started pool."""
        spec, pool = self.spec, self.pool
        store = open_store(spec.output)
        self.frames_total = plan.frame_count
        self.segments_total = len(plan.shards)
        self._segments_folder = segment_key(job_id, plan.shards[0], spec.format).rpartition("/")[0]
        # Partial files of an earlier run of this job that was killed (its workers with it).
        _discard_partial(spec.output, self._segments_folder)
        log.info("job %s: %d latent frames -> %d frames in %d shards on %d %s workers, context %d "
                 "(%.1f%% more latents, %.1f%% more decode work)", job_id, plan.latent_frames, plan.frame_count,
                 len(plan.shards), pool.size, "GPU" if pool.use_gpu else "CPU", plan.context,
                 100 * plan.overhead, 100 * plan.compute_overhead)
        metas: dict[int, SegmentRecord] = {}
        for shard in plan.shards:
            reused = self._committed(store, segment_key(job_id, shard, spec.format), job_id)
            if reused is not None:
                metas[shard.index] = reused
        self.segments_committed = len(metas)
        if metas:
            log.info("job %s: reusing %d committed segments", job_id, len(metas))
        todo = deque((shard, 1) for shard in plan.shards if shard.index not in metas)
        encoder = spec.encoder
        if todo:
            with self._clock.phase("first worker ready", "waits for a worker, which loads the decoder"):
                encoder = self._check_input(latents).get("encoder", spec.encoder)
            # A resumed job's reused segments must share the encoder of those still to come
            # (a first run on NVENC nodes, a resume on libx264 ones): the stitcher joins only
            # identical streams, so the others are redone.
            stale = [] if spec.format != "mp4" else sorted(
                i for i, m in metas.items() if (m.codec or encoder) != encoder)
            if stale:
                log.info("job %s: redoing %d segments encoded with another encoder", job_id, len(stale))
                for i in stale:
                    del metas[i]
                self.segments_committed = len(metas)
                todo = deque((shard, 1) for shard in plan.shards if shard.index not in metas)

        # Claims an interrupted run left (their claimants gone before committing) would keep
        # this run's copies of the same attempts from committing. No writer runs yet.
        committed = {m.key for m in metas.values()}
        for key in store.list(self._segments_folder + "/"):
            if key.endswith(CLAIM_SUFFIX) and key.rpartition(".a")[0] not in committed:
                store.delete(key)
        removed = sweep(store, keep={job_id})
        if removed:
            log.info("job %s: removed %d leftovers of interrupted runs from %s", job_id, len(removed), spec.output)
        # The video is written into this render's own folder; OUTPUT shows it once published.
        link = pool.start_stitcher(spec.output, spec.format, spec.fps, len(plan.shards), render_prefix(job_id))
        # Announced (with its pid) once it is up, not here: waiting for the stitcher's process
        # would put its start-up before the first dispatch (11 s of a warm-farm job's 12 s to
        # its first frame on a loaded 2-core host). It is up before any "done" is announced.
        self._stitcher_announced = False
        self._heals = {"stitcher": 0}
        ok = False
        try:
            for i in sorted(metas):
                link.add(metas[i].segment)
            while True:
                self._render_shards(plan, latents, job_id, todo, metas, link, encoder)
                if self.cancelled.is_set():  # every shard done, but the video is not: it never will be
                    raise JobCancelled(f"job {job_id} cancelled")
                try:
                    stitch = link.finish()
                    break
                except (SegmentError, StitcherLost) as exc:
                    self._heal_stitching(exc, link, plan, metas, todo)  # then render what it requeued
            ok = True
        finally:
            link.close(ok)
        return self._report(plan, store, [metas[i] for i in sorted(metas)], stitch, job_id, t_job)

    def record_phase(self, name: str, start: float, end: float | None = None) -> None:
        """A step of the job before its first shard taken outside it (the CLI joining Ray)."""
        self._clock.add(name, start, time.time() if end is None else end)

    def _check_input(self, latents: torch.Tensor) -> dict:
        """The first worker up loads the model, says whether a frame fits its device and which
        encoder "auto" means for this job. A refusal comes before the stitcher exists, so
        nothing is written. A worker found dead here (a Farm's, lost between jobs) is
        replaced and the next one asked."""
        spec, pool = self.spec, self.pool
        for attempt in range(1, spec.max_attempts + 1):
            pool.wait_ready(self.startup_timeout_s, self.cancelled)
            # An idle worker if there is one: in a Farm's pool, another job's busy worker would
            # answer only after its shard.
            claimed = pool.claim(1)
            worker = claimed[0] if claimed else pool.ready()[0]
            try:
                return pool.check_input(worker, spec.decoder, latents.shape[2], latents.shape[3],
                                        spec.encoder if spec.format == "mp4" else None, self.compile_cache)
            except WorkerLost as exc:
                log.warning("a decode worker was lost before the job began (%s); replacing it", exc)
                pool.replace(worker)
                if attempt == spec.max_attempts:
                    raise
            finally:
                if claimed:
                    pool.release(worker)
        raise AssertionError("unreachable")

    def _heal_stitching(self, exc: BaseException, link: JobStitcher, plan, metas, todo) -> None:
        """What the stitcher reported, mended: a committed segment that failed verification is
        deleted and its shard queued again; a dead stitcher is replaced. Either way the (new)
        stitcher gets every committed segment again. Bounded: a shard's segment heals at most
        max_attempts times, the stitcher restarts at most max_attempts times; past that the
        job fails with one line."""
        spec = self.spec
        cause = exc
        if isinstance(cause, SegmentError) and cause.key is not None:
            index = next((i for i, m in metas.items() if m.key == cause.key), None)
            if index is None:
                raise cause
            self._heals[index] = self._heals.get(index, 0) + 1
            if self._heals[index] > spec.max_attempts:
                raise SegmentError(f"shard {index}: its segment failed verification {self._heals[index]} times; "
                                   f"last: {cause}", cause.key) from None
            log.warning("shard %d: committed segment failed verification (%s); deleting it and rendering the "
                        "shard again", index, cause)
            store = open_store(spec.output)
            store.delete(sidecar_key(cause.key))
            store.delete(cause.key)
            meta = metas.pop(index)
            self.segments_committed -= 1
            self.frames_done -= meta.frames
            todo.appendleft((plan.shards[index], meta.attempt + 1))
            self.on_event("heal", {"shard": plan.shards[index], "key": cause.key})
        elif isinstance(exc, StitcherLost):
            self._heals["stitcher"] += 1
            if self._heals["stitcher"] > spec.max_attempts:
                raise RuntimeError(f"the stitcher died {self._heals['stitcher']} times (last: {exc}); "
                                   "committed segments are kept: run the job again to resume") from None
            log.warning("the stitcher was lost (%s); starting another and handing it the %d committed segments",
                        exc, len(metas))
        else:
            raise exc
        link.restart([metas[i].segment for i in sorted(metas)])
        self._stitcher_announced = False
        self._announce_stitcher(link, wait=True)

    def _announce_stitcher(self, link: JobStitcher, wait: bool) -> None:
        """The "stitcher" event, once per stitcher: when it is up, or (`wait`) now."""
        if not self._stitcher_announced and (wait or link.started()):
            try:
                pid = link.pid()
            except StitcherLost:
                return  # it died starting: the link's next check heals it, and announces the next
            self._stitcher_announced = True
            self.on_event("stitcher", {"pid": pid})

    def _render_shards(self, plan, latents, job_id, todo, metas, link, encoder):
        """Hand shards to free workers until every one is committed: retry those whose worker
        was lost, and those that failed in a way that may pass; abandon stalled ones; once no
        shard waits, back up the slowest running one on a worker that fell idle."""
        spec, pool = self.spec, self.pool
        bar = tqdm(total=plan.frame_count, unit="frame", desc="render", disable=not self.show_progress,
                   file=sys.stderr, mininterval=1.0)
        # While the bar is drawn, log lines go out through it, each on a line of its own
        # rather than after the bar's text on the bar's line.
        redirect = contextlib.ExitStack()
        if self.show_progress:
            redirect.enter_context(logging_redirect_tqdm(tqdm_class=type(bar)))
        # Counted apart from the bar: a disabled bar (submit's jobs) counts nothing.
        self.frames_done = sum(m.frames for m in metas.values())
        bar.update(self.frames_done)
        inflight: dict[Handle, _Copy] = {}
        shared: dict[int, object] = {}  # shard index -> its latents as the pool shares them, kept for retries

        def dispatch(worker, shard: Shard, attempt: int, backup: bool = False) -> None:
            if shard.index not in shared:
                shared[shard.index] = pool.share(LatentSlice.of(latents[:, shard.context_start:shard.stop]))
            task = shard_task(spec, job_id, shard, encoder=encoder, compile_cache=self.compile_cache, attempt=attempt,
                              run_id=self.run_id)
            now = time.monotonic()
            inflight[pool.submit(worker, task, shared[shard.index])] = _Copy(shard, attempt, worker, now, backup,
                                                                              moved=now)
            self.on_event("dispatch", {"shard": shard, "attempt": attempt, "worker": worker, "backup": backup,
                                       "info": pool.describe(worker)})

        try:
            while todo or inflight:
                self._announce_stitcher(link, wait=False)
                if self.cancelled.is_set():
                    raise JobCancelled(f"job {job_id} cancelled")
                try:
                    link.check()  # a dead stitcher or a bad segment is seen now, not after the last shard
                except (SegmentError, StitcherLost) as exc:
                    self._heal_stitching(exc, link, plan, metas, todo)
                pool.set_pending(job_id, len(todo) + len({c.shard.index for c in inflight.values()}))
                for worker in pool.claim(len(todo)):  # idle workers, this job's until released
                    if self.cancelled.is_set():  # nothing new starts once the job is cancelled
                        pool.release(worker)
                        continue
                    dispatch(worker, *todo.popleft())
                if not inflight:
                    # Shards wait and no worker is up: every one died. Wait for the replacements.
                    pool.wait_ready(self.startup_timeout_s, self.cancelled)
                    continue
                if spec.backups and not todo:
                    self._back_up(inflight, dispatch)
                for handle in pool.wait_any(list(inflight), timeout_s=1.0):
                    if handle in inflight:  # not withdrawn by an earlier one's commit
                        self._settle(handle, inflight.pop(handle), inflight, todo, metas, link, plan, bar)
                    shared = {i: s for i, s in shared.items() if i not in metas}  # committed: let go
                if pool.watches_progress:
                    self._abandon_stalled(inflight, todo)
        finally:
            redirect.close()
            bar.close()
            pool.set_pending(job_id, 0)  # the job is over, whichever way
            # Work still in flight belongs to a job that is ending (cancelled or failed).
            for handle, copy in inflight.items():
                pool.abandon(handle, copy.worker)

    def _back_up(self, inflight: dict, dispatch) -> None:
        """Workers fell idle with no shard waiting: the slowest running shards (no decode step
        for the longest, then running the longest) get a second copy each, one per idle
        worker. Slow means running for more than BACKUP_AFTER times this job's median shard."""
        if not self._shard_seconds:
            return  # nothing to compare with yet
        now, typical = time.monotonic(), statistics.median(self._shard_seconds)
        copies = collections.Counter(c.shard.index for c in inflight.values())
        slow = sorted((c for c in inflight.values()
                       if copies[c.shard.index] == 1 and now - c.dispatched > BACKUP_AFTER * typical),
                      key=lambda c: (c.moved, c.dispatched))
        if not slow:
            return
        for worker, copy in zip(self.pool.claim(len(slow)), slow):
            self.backup_shards += 1
            log.warning("shard %d: running %.1f s (this job's shards take %.1f s); starting a backup copy on an "
                        "idle worker, the first copy to commit wins", copy.shard.index, now - copy.dispatched, typical)
            self._incident("backup", copy.shard, copy.attempt)
            self.on_event("backup", {"shard": copy.shard, "attempt": copy.attempt, "worker": worker})
            dispatch(worker, copy.shard, copy.attempt, backup=True)

    def _incident(self, name: str, shard: Shard, attempt: int, **detail) -> None:
        """A stall or a backup, for the timeline."""
        self._incidents.append({"name": name, "at": time.time(), "shard": shard.index, "attempt": attempt, **detail})

    def _retry(self, todo, shard: Shard, attempt: int, why: str) -> bool:
        """Queue the shard again, first in line, unless it had its attempts."""
        if attempt >= self.spec.max_attempts:
            return False
        log.warning("shard %d: %s; retrying (attempt %d)", shard.index, why, attempt + 1)
        self.on_event("retry", {"shard": shard, "attempt": attempt + 1})
        todo.appendleft((shard, attempt + 1))
        return True

    def _settle(self, handle, copy: _Copy, inflight: dict, todo, metas, link, plan, bar) -> None:
        """One finished call: commit its shard, or retry it, or fail the job. While another copy
        of the same shard runs, a failed copy is only dropped: the other may still commit."""
        pool, shard, attempt = self.pool, copy.shard, copy.attempt
        twin = any(c.shard.index == shard.index for c in inflight.values())
        try:
            record = pool.result(handle)
        except ShardFailed as exc:
            pool.release(copy.worker)  # the worker is fine: free for the next shard
            if shard.index in metas or (twin and (retryable(exc.cause) or
                                                  isinstance(exc.cause, (SegmentTaken, ShardWithdrawn)))):
                return  # the other copy committed, or may still
            if isinstance(exc.cause, (SegmentTaken, ShardWithdrawn)):
                # The claimant is gone without committing (lost after its claim): again.
                if not self._retry(todo, shard, attempt, str(exc)):
                    raise RuntimeError(f"shard {shard.index} failed {attempt} times; last: {exc}") from None
                return
            # The worker is fine but its shard failed. Worth another try only if the cause
            # may pass (I/O, the network, object storage); bad input or a bug fails the same
            # way every time: the caller gets the worker's own error.
            if not (retryable(exc.cause) and self._retry(todo, shard, attempt, str(exc))):
                raise exc.cause from None
            return
        except WorkerLost as exc:
            pool.replace(copy.worker)  # a replacement, wherever the pool finds room (or none yet)
            if shard.index in metas or twin:
                return
            if not self._retry(todo, shard, attempt, f"worker lost ({exc})"):
                raise RuntimeError(f"shard {shard.index} failed {attempt} times; last: {exc}") from None
            return
        pool.release(copy.worker)
        if shard.index in metas:
            return  # cannot happen (one copy claims the segment); never hand the stitcher a shard twice
        for other, c in [(h, c) for h, c in inflight.items() if c.shard.index == shard.index]:
            del inflight[other]  # the losing copy: stopped, its worker back to the pool when it returns
            pool.withdraw(other, c.worker, run_key(self.job_id, self.run_id), shard.index)
        if copy.backup:
            self.backup_wins += 1
            log.info("shard %d: the backup copy committed first; the other copy was withdrawn", shard.index)
            self._incident("backup won", shard, attempt)
        self._shard_seconds.append(time.monotonic() - copy.dispatched)
        metas[shard.index] = record
        self.segments_committed += 1
        link.add(record.segment)
        bar.update(record.frames)
        self.frames_done += record.frames
        w, r = record.worker, record.report
        log.info("shard %d/%d done on %s (%s): %d frames in %.1f s, %s %.0f%%, bottleneck %s",
                 shard.index + 1, len(plan.shards), w.hostname, w.device_name, record.frames,
                 record.ended - record.started, busy_label(w.device), 100 * r.gpu_utilization,
                 stage_label(r.bottleneck, w.device))
        self._announce_stitcher(link, wait=True)
        self.on_event("done", record)

    def _abandon_stalled(self, inflight: dict, todo) -> None:
        """A shard copy whose worker took no decode step for stall_s is abandoned: its worker
        (stopped, hung in a driver call, or behind a dead mount) is replaced, the shard re-run
        unless another copy of it still runs."""
        spec, pool, now = self.spec, self.pool, time.monotonic()
        for handle, copy in list(inflight.items()):
            if handle not in inflight:
                continue
            steps = pool.steps(copy.worker)
            if steps is not None and steps != copy.steps:
                copy.steps, copy.moved = steps, now
            if now - copy.moved < spec.stall_s:
                continue
            del inflight[handle]
            pool.replace(copy.worker)
            self.stalled_shards += 1
            shard, attempt = copy.shard, copy.attempt
            self._incident("stall", shard, attempt, seconds=round(now - copy.moved, 1))
            twin = any(c.shard.index == shard.index for c in inflight.values())
            log.warning("shard %d: no decode step for %.0f s on its worker; abandoning this copy and replacing "
                        "the worker%s", shard.index, now - copy.moved,
                        "; its other copy runs on" if twin else f", running it again (attempt {attempt + 1})")
            self.on_event("stall", {"shard": shard, "attempt": attempt + 1, "worker": copy.worker})
            if twin:
                continue
            if attempt >= spec.max_attempts:
                raise RuntimeError(f"shard {shard.index} made no progress for {spec.stall_s:.0f} s on attempt "
                                   f"{attempt} of {spec.max_attempts}; giving up")
            todo.appendleft((shard, attempt + 1))

    def _report(self, plan, store, all_metas, stitch, job_id, t_job) -> JobResult:
        """Step 5 after the video: manifest, timeline, summary; then drop the segments."""
        spec, pool = self.spec, self.pool
        prefix = render_prefix(job_id)
        rows = manifest_rows(all_metas, segments_kept=spec.keep_segments)
        store.put_bytes(f"{prefix}/manifest.parquet", manifest_parquet(rows))
        store.put_bytes(f"{prefix}/timeline.json",
                        chrome_trace(all_metas, t_job, stitch, self._clock.phases, render=job_id,
                                     incidents=self._incidents))
        # The job's time ends here, with everything but its summary written: what follows
        # (the summary, publishing by renames, deleting segments) cannot be in the summary.
        wall = time.time() - t_job
        summary = summarize(all_metas, frames=plan.frame_count, fps=spec.fps, wall_s=wall,
                            workers=pool.workers_used(all_metas),
                            use_gpu=pool.use_gpu, price_per_gpu_hour=spec.price_per_gpu_hour,
                            plan_overhead=plan.overhead, stitch=stitch, job_started=t_job,
                            driver_phases=self._clock.phases,
                            extra={"job_id": job_id, "latent_frames": plan.latent_frames,
                                   "context": plan.context, "context_mode": spec.context_mode,
                                   "farm": pool.farm,
                                   "context_compute_overhead": plan.compute_overhead,
                                   "decoder": spec.decoder.model_dump(),
                                   "format": spec.format, "stalled_shards": self.stalled_shards,
                                   "backup_shards": self.backup_shards, "backup_wins": self.backup_wins,
                                   "decoded_latent_frames": sum(m.shard.decoded_latent_frames
                                                                for m in all_metas if not m.reused)})
        local = store.local_path(stitch["key"]) is not None
        # What a reader opens: the view locally (OUTPUT/video.mp4), the render's own key on S3.
        summary["video"] = stitch["video"] if local else f"{prefix}/{stitch['video']}"
        summary["render"] = job_id
        store.put_bytes(f"{prefix}/summary.json", json.dumps(summary, indent=2).encode())
        record = make_record(store, job_id, stitch["video"], plan.frame_count)
        self._lease.check()  # a job taken over while it stalled must not publish over the new holder
        publish(store, record, self._previous)
        if not spec.keep_segments:
            # Segments exist for retries and resumes; once the video is committed they are dead
            # weight (the bucket's lifecycle rule expires those of abandoned jobs).
            for m in all_metas:
                store.delete(sidecar_key(m.key))
                store.delete(m.key)
                self.segments_committed -= 1
            for key in store.list(self._segments_folder + "/"):
                if key.endswith(CLAIM_SUFFIX):
                    store.delete(key)
            store.discard_partial(self._segments_folder)
        sweep(store, keep={job_id})  # what workers or a stitcher killed during this run left
        log.info("job %s: wrote %s (%d frames, %.1f s of video) in %.1f s", job_id,
                 spec.output.rstrip("/") + "/" + summary["video"], plan.frame_count, plan.frame_count / spec.fps,
                 wall)
        return JobResult(output=spec.output, manifest=rows, summary=summary, plan=plan)

    @staticmethod
    def _committed(store, key: str, fingerprint: str) -> SegmentRecord | None:
        """A previous run's record for `key`, if that segment was committed for this job."""
        side = sidecar_key(key)
        if not (store.exists(side) and store.exists(key)):
            return None
        try:
            record = SegmentRecord.from_json(store.get_bytes(side))
        except ValueError:
            return None  # damaged, or written by another version: the shard is redone
        if record.job_id != fingerprint or record.key != key or store.size(key) != record.bytes:
            return None
        return dataclasses.replace(record, reused=True)


def _discard_partial(output: str, folder: str) -> None:
    removed = open_store(output).discard_partial(folder)
    if removed:
        log.info("removed %d partial files that stopped workers left in %s", removed, folder)


# Object-store refusals that the same request meets every time: no retry can succeed.
_PERMANENT_S3_CODES = {"NoSuchBucket", "InvalidBucketName", "AccessDenied", "InvalidAccessKeyId",
                       "SignatureDoesNotMatch", "AllAccessDisabled", "AccountProblem", "InvalidObjectState"}


def retryable(cause: BaseException | None) -> bool:
    """Errors a retry may not meet again: the OS's (disk, network, a vanished scratch file)
    and those of boto3's stack, which is matched by module so that boto3 need not be imported.
    Refusals that cannot pass (a read-only filesystem, a missing bucket, denied access,
    missing credentials) are not retried."""
    if isinstance(cause, OSError):
        return cause.errno != errno.EROFS
    module = type(cause).__module__ or ""
    if module.split(".")[0] not in ("botocore", "boto3", "s3transfer", "urllib3"):
        return False
    if type(cause).__name__ in ("NoCredentialsError", "PartialCredentialsError", "ParamValidationError"):
        return False
    response = getattr(cause, "response", None)
    if isinstance(response, dict):
        return response.get("Error", {}).get("Code") not in _PERMANENT_S3_CODES
    # boto3's transfer wraps the client's error into text: "An error occurred (NoSuchBucket) ..."
    return not any(f"({code})" in str(cause) for code in _PERMANENT_S3_CODES)


"""A lease on an output location: one render writes into an OUTPUT at a time.

The lease is a small JSON object in the store, created only where none exists (locally an
exclusive hard link, on S3 a conditional PUT, `If-None-Match: *`), naming its holder: host,
pid, job, a random token, and an expiry that the live holder pushes forward (`Renewer`).

Leases are numbered (`.framefarm-lease.00000001.json`, ...); the highest number is the
lease. A stale lease (expired, or its holder a dead process on this host) is taken over by
creating the next number, which only one taker can do; the taker then deletes the lower
ones. A holder that was taken over (it stalled past its expiry) finds the next number, or
another token under its own, at its next renewal or check, and must stop writing.

A lease whose holder is this very process is live only while a `Lease` of this process holds
it: a job that failed where the store could not be reached (S3 cut) cannot delete its lease,
and a rerun from the same process (a notebook) must not be told the job "is already running"
until the lease expires.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from infra.scratch import process_start
from infra.storage import ObjectStore

log = logging.getLogger(__name__)

LEASE_PREFIX = ".framefarm-lease."
_LEASE_KEY = re.compile(r"^\.framefarm-lease\.(\d{8})\.json$")
DEFAULT_TTL_S = 60.0

# The tokens of the leases this process holds: the one fact about a lease that no store and
# no other process can tell, like a process's table of its open files.
_held_here: set[str] = set()
_held_lock = threading.Lock()


def _holding(token: str) -> bool:
    with _held_lock:
        return token in _held_here


def lease_key(generation: int) -> str:
    return f"{LEASE_PREFIX}{generation:08d}.json"


@dataclass(frozen=True)
class Holder:
    job: str
    host: str
    pid: int
    pid_start: int | None
    token: str
    expires: float  # seconds since the epoch
    acquired: float

    def describe(self) -> str:
        left = self.expires - time.time()
        return (f"job {self.job} (host {self.host}, pid {self.pid}, lease "
                + (f"renewed until {left:.0f} s from now)" if left > 0 else f"expired {-left:.0f} s ago)"))

    def stale(self, now: float) -> bool:
        """Expired, held by a process of this host that is gone, or by this process, which
        gave it up (its job ended) without being able to delete it."""
        if self.expires <= now:
            return True
        if self.host != socket.gethostname():
            return False
        if process_start(self.pid) != self.pid_start:
            return True
        return self.pid == os.getpid() and not _holding(self.token)


class LeaseHeld(RuntimeError):
    """Another live job holds the lease."""

    def __init__(self, uri: str, holder: Holder):
        self.holder = holder
        super().__init__(f"{uri} is being rendered by {holder.describe()}")


class LeaseLost(RuntimeError):
    """This job's lease was taken over (it stalled past its expiry) or removed."""


def _parse(data: bytes) -> Holder | None:
    try:
        return Holder(**json.loads(data))
    except (ValueError, TypeError):
        return None  # not a lease this code wrote: never live


class Lease:
    """A held lease. `acquire` makes one; `renew`, `check` and `release` keep and end it."""

    def __init__(self, store: ObjectStore, generation: int, holder: Holder, ttl_s: float,
                 made_root: str | None = None):
        self.store, self.generation, self.holder, self.ttl_s = store, generation, holder, ttl_s
        self._made_root = made_root  # a local OUTPUT folder that only the lease brought into being

    @classmethod
    def acquire(cls, store: ObjectStore, job: str, ttl_s: float = DEFAULT_TTL_S, attempts: int = 8) -> Lease:
        """Take the lease on `store`, or raise LeaseHeld naming the live holder."""
        pid = os.getpid()
        last: Holder | None = None
        root = store.local_path(lease_key(1))
        made_root = os.path.dirname(root) if root and not os.path.isdir(os.path.dirname(root)) else None
        for _ in range(attempts):
            generations = sorted(int(m.group(1)) for k in store.list(LEASE_PREFIX)
                                 if (m := _LEASE_KEY.match(k)))
            next_generation = 1
            if generations:
                top = generations[-1]
                try:
                    current = _parse(store.get_bytes(lease_key(top)))
                except FileNotFoundError:
                    continue  # released while we looked: look again
                if current is not None and not current.stale(time.time()):
                    raise LeaseHeld(store.uri, current)
                if current is not None:
                    last = current
                    log.warning("taking over the stale lease on %s of %s", store.uri, current.describe())
                next_generation = top + 1
            now = time.time()
            holder = Holder(job=job, host=socket.gethostname(), pid=pid, pid_start=process_start(pid),
                            token=secrets.token_hex(8), expires=now + ttl_s, acquired=now)
            with _held_lock:
                _held_here.add(holder.token)  # before it exists: no look of another thread sees it unheld
            created = False
            try:
                created = store.create_bytes(lease_key(next_generation), json.dumps(asdict(holder)).encode())
            finally:
                if not created:
                    with _held_lock:
                        _held_here.discard(holder.token)
            if created:
                for g in generations:  # the stale ones this one replaces
                    store.delete(lease_key(g))
                return cls(store, next_generation, holder, ttl_s, made_root)
            # Another taker created that number first: it holds the lease now, or will be
            # seen as stale on the next look.
        raise LeaseHeld(store.uri, last) if last else RuntimeError(f"could not take the lease on {store.uri}")

    def check(self) -> None:
        """Raise LeaseLost unless this lease is still the store's."""
        if self.store.exists(lease_key(self.generation + 1)):
            raise LeaseLost(f"the lease on {self.store.uri} was taken over by another job")
        try:
            current = _parse(self.store.get_bytes(lease_key(self.generation)))
        except FileNotFoundError:
            current = None
        if current is None or current.token != self.holder.token:
            raise LeaseLost(f"the lease on {self.store.uri} is no longer this job's")

    def renew(self) -> None:
        self.check()
        now = time.time()
        holder = Holder(**{**asdict(self.holder), "expires": now + self.ttl_s})
        self.store.put_bytes(lease_key(self.generation), json.dumps(asdict(holder)).encode())
        self.holder = holder

    def release(self) -> None:
        """Give the lease up, if it is still this job's. Once called, the lease is stale to
        every later look from this process, even if the store could not be reached."""
        with _held_lock:
            _held_here.discard(self.holder.token)
        try:
            self.check()
        except LeaseLost:
            return
        self.store.delete(lease_key(self.generation))
        if self._made_root:
            try:
                os.rmdir(self._made_root)  # a job refused before writing leaves no empty OUTPUT
            except OSError:
                pass  # it holds the render (or anything else): it stays


class Renewer:
    """Renews a lease every quarter of its lifetime in a thread until stopped; calls `on_lost`
    (once) if the lease was lost or could not be renewed before it expired."""

    def __init__(self, lease: Lease, on_lost: Callable[[BaseException], None]):
        self.lease, self.on_lost = lease, on_lost
        self.lost: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="framefarm-lease", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        interval = self.lease.ttl_s / 4
        while not self._stop.wait(interval):
            try:
                self.lease.renew()
            except LeaseLost as exc:
                self._lose(exc)
                return
            except Exception as exc:  # noqa: BLE001 - storage hiccup: retry until the lease expires
                if time.time() >= self.lease.holder.expires - interval:
                    self._lose(LeaseLost(f"could not renew the lease on {self.lease.store.uri}: {exc}"))
                    return
                log.warning("lease renewal on %s failed (%s); retrying", self.lease.store.uri, exc)

    def _lose(self, exc: BaseException) -> None:
        self.lost = exc
        self.on_lost(exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

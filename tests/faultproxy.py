"""A TCP proxy on loopback that a test can cut, stall and restore: the network between
framefarm's processes and a server (moto's S3) failing on cue.

    with FaultProxy(("127.0.0.1", 5000)) as proxy:      # proxy.url -> "http://127.0.0.1:PORT"
        proxy.on_request(rb"PUT /bucket/out/segments/\\S+\\.mp4 ", "cut", nth=2)
        ... run something that talks to proxy.url ...
        proxy.wait_until(lambda s: s.refused >= 3)    # clients tried again and were refused
        proxy.restore()

States:
- open: bytes flow both ways;
- cut: every live connection is shut at once, and each new one is accepted and shut at once
  (clients see a connection closed mid-request or before any answer);
- stalled: connections stay up, and new ones are accepted, but no byte moves either way
  (clients see no answer until their own timeout); restore lets the held bytes flow.

Tests synchronise on what the proxy saw (`Stats`, `wait_until`), never on sleeps. A trigger
(`on_request`) acts on the very chunk whose start matches, before a byte of it is forwarded.
Pytest-free, threads only.
"""

from __future__ import annotations

import dataclasses
import re
import socket
import threading
from collections.abc import Callable

OPEN, CUT, STALLED = "open", "cut", "stalled"


@dataclasses.dataclass
class Stats:
    accepted: int = 0  # connections taken while open or stalled
    refused: int = 0  # connections shut on arrival while cut
    held: int = 0  # client chunks that arrived while stalled (each try of a request is one)
    shut: int = 0  # live connections shut by a cut
    requests: int = 0  # client chunks forwarded
    matched: int = 0  # chunks that matched a trigger's pattern


class FaultProxy:
    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.state = OPEN
        self.stats = Stats()
        self._cond = threading.Condition()
        self._live: set[socket.socket] = set()
        self._triggers: list[list] = []  # [pattern, action, nth, seen]
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)  # so that close() is noticed by the accept loop
        self.port = self._listener.getsockname()[1]
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True)
        self._acceptor.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- control -------------------------------------------------------------------------

    def cut(self) -> None:
        with self._cond:
            self._cut_locked()

    def stall(self) -> None:
        with self._cond:
            self.state = STALLED
            self._cond.notify_all()

    def restore(self) -> None:
        with self._cond:
            self.state = OPEN
            self._cond.notify_all()

    def reset(self) -> None:
        """Open, no triggers, counts from zero: a fresh proxy for the next test."""
        with self._cond:
            self.state = OPEN
            self._triggers.clear()
            self.stats = Stats()
            self._cond.notify_all()

    def on_request(self, pattern: bytes, action: str, nth: int = 1) -> None:
        """`action` ("cut" or "stall") when the `nth` client chunk matching `pattern` (a regex
        matched at the chunk's start) arrives; that chunk is then dropped or held, not sent."""
        if action not in (CUT, "stall"):
            raise ValueError(f"action must be 'cut' or 'stall', not {action!r}")
        with self._cond:
            self._triggers.append([re.compile(pattern), action, nth, 0])

    def wait_until(self, condition: Callable[[Stats], bool], timeout_s: float = 120.0) -> Stats:
        with self._cond:
            if not self._cond.wait_for(lambda: condition(self.stats), timeout_s):
                raise TimeoutError(f"the proxy did not see that in {timeout_s} s: {self.stats}")
            return dataclasses.replace(self.stats)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self.state = OPEN
            self._shut_all_locked()
            self._cond.notify_all()
        self._acceptor.join(timeout=10)
        self._listener.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- inside --------------------------------------------------------------------------

    def _cut_locked(self) -> None:
        self.state = CUT
        self.stats.shut += self._shut_all_locked()
        self._cond.notify_all()

    def _shut_all_locked(self) -> int:
        # shutdown() wakes a thread blocked in recv() on the socket; close() alone would not.
        n = len(self._live) // 2
        for s in self._live:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._live.clear()
        return n

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                if self.state == CUT:
                    self.stats.refused += 1
                    self._cond.notify_all()
                    _shut(client)
                    continue
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                _shut(client)
                continue
            server.settimeout(None)
            client.settimeout(None)
            with self._cond:
                self.stats.accepted += 1
                self._live.update((client, server))
                self._cond.notify_all()
            for src, dst, up in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, up), daemon=True,
                                 name="faultproxy-pump").start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while True:
                try:
                    data = src.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                with self._cond:
                    for trigger in self._triggers if upstream else ():
                        pattern, action, nth, seen = trigger
                        if pattern.match(data):
                            trigger[3] = seen = seen + 1
                            self.stats.matched += 1
                            if seen == nth and self.state == OPEN:
                                # Acted on under the lock: no other chunk slips through first.
                                if action == CUT:
                                    self._cut_locked()
                                else:
                                    self.state = STALLED
                    self._cond.notify_all()
                    if self.state == STALLED and upstream:
                        self.stats.held += 1
                        self._cond.notify_all()
                    stalled = self.state == STALLED
                    self._cond.wait_for(lambda: self.state != STALLED)
                    if self.state == CUT or src not in self._live:
                        break
                    if stalled and upstream and _gone(src):
                        break  # its client gave up waiting: a real network would not deliver it late
                    if upstream:
                        self.stats.requests += 1
                try:
                    dst.sendall(data)
                except OSError:
                    break
        finally:
            with self._cond:
                self._live.discard(src)
                self._live.discard(dst)
            _shut(src)
            _shut(dst)


def _gone(s: socket.socket) -> bool:
    """Whether the peer closed `s` (reads would give end of file), without taking any bytes."""
    try:
        return s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _shut(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()

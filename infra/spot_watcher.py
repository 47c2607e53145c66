"""Spot interruption watcher: drain this node's Ray raylet when EC2 says it will be reclaimed.

    python -m infra.spot_watcher --address HEAD_IP:6379 [--node-id HEX] [--interval 5]
                                 [--imds-url http://169.254.169.254]

ray_cluster.yaml starts one on every GPU worker (a systemd unit, after `ray start`).
EC2 gives a spot instance about two minutes' notice through the instance metadata service
(IMDSv2: PUT /latest/api/token, then GET /latest/meta-data/spot/instance-action, which is
404 until a notice exists). On a notice the watcher asks the GCS to drain the node with
reason PREEMPTION and the notice's time as the deadline - the same call `ray drain-node`
(a hidden command in Ray 2.60) and the autoscaler make. A draining node:

  - gets no new tasks or actors: replacement decode workers (and the autoscaler's new
    capacity for them) land on other nodes;
  - keeps running what it has until the instance goes, so a shard that can finish in the
    notice window still lands. Calls to actors already there still reach them: a driver
    that wants to stop feeding them can read the draining nodes
    (ray._private.state.state.get_draining_nodes()) before handing out a shard;
  - ends (the raylet exits, the node is DEAD with reason AUTOSCALER_DRAIN_PREEMPTED) once
    idle, or when EC2 takes the instance; its actors' callers then see RayActorError and
    the driver retries their shards elsewhere.

The watcher exits 0 once the drain is accepted: there is nothing left for it to do.
Network errors and a GCS that refuses the drain are logged and retried at the next poll.

The drain action is any callable `drain(notice) -> bool`, so `watch` runs without Ray;
`RayDrain` is the real one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

log = logging.getLogger("framefarm.spot_watcher")

IMDS_URL = "http://169.254.169.254"
TOKEN_PATH = "/latest/api/token"
NOTICE_PATH = "/latest/meta-data/spot/instance-action"
TOKEN_TTL_S = 21600  # the most IMDS grants; refreshed before it runs out, or on a 401
NOTICE_WINDOW_S = 120  # what EC2 promises; the deadline when a notice's time is unreadable
DEFAULT_INTERVAL_S = 5.0  # AWS's suggestion for polling instance-action


@dataclass(frozen=True)
class Notice:
    """An interruption notice: action is terminate, stop or hibernate; time is UTC."""

    action: str
    time: str

    def deadline_ms(self, now: float | None = None) -> int:
        """Unix milliseconds when EC2 will take the instance (a bit early if unreadable)."""
        try:
            when = datetime.strptime(self.time, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
            return int(when.timestamp() * 1000)
        except (TypeError, ValueError):
            return int(((time.time() if now is None else now) + NOTICE_WINDOW_S) * 1000)


class Imds:
    """The few IMDSv2 calls the watcher makes, against `base_url` (a local server in tests)."""

    def __init__(self, base_url: str = IMDS_URL, timeout: float = 2.0, token_ttl: int = TOKEN_TTL_S):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.token_ttl = token_ttl
        self._token: str | None = None
        self._token_expires = 0.0
        # Never through an HTTP(S)_PROXY: the metadata service is link-local, and a proxy
        # would fail every poll (the AWS SDKs bypass proxies for it too).
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _request(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        req = urllib.request.Request(self.base_url + path, method=method, headers=headers)
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def token(self) -> str:
        if self._token is None or time.monotonic() >= self._token_expires:
            status, body = self._request(
                "PUT", TOKEN_PATH, {"X-aws-ec2-metadata-token-ttl-seconds": str(self.token_ttl)})
            if status != 200:
                raise OSError(f"IMDS token request answered {status}")
            self._token = body.decode().strip()
            self._token_expires = time.monotonic() + 0.9 * self.token_ttl
        return self._token

    def get(self, path: str) -> tuple[int, bytes]:
        """GET with a session token; one retry with a fresh token if it was refused."""
        status, body = self._request("GET", path, {"X-aws-ec2-metadata-token": self.token()})
        if status == 401:
            self._token = None
            status, body = self._request("GET", path, {"X-aws-ec2-metadata-token": self.token()})
        return status, body

    def spot_notice(self) -> Notice | None:
        status, body = self.get(NOTICE_PATH)
        if status == 404:
            return None
        if status != 200:
            raise OSError(f"IMDS {NOTICE_PATH} answered {status}")
        doc = json.loads(body)
        return Notice(action=str(doc.get("action", "terminate")), time=str(doc.get("time", "")))


def local_node_id(gcs_client, ip: str | None = None) -> str:
    """The hex id of the one alive Ray node on this host's IP (the worker's own raylet)."""
    import ray._private.services
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    ip = ip or ray._private.services.get_node_ip_address()
    alive = [info for info in gcs_client.get_all_node_info(timeout=10).values()
             if info.state == GcsNodeInfo.ALIVE and info.node_manager_address == ip]
    if len(alive) != 1:
        raise RuntimeError(f"{len(alive)} alive Ray nodes on {ip}; pass --node-id")
    return alive[0].node_id.hex()


class RayDrain:
    """Drain a node through the GCS (reason PREEMPTION, deadline the notice's time).

    node_id None: the node on this host, looked up when the notice comes (a raylet
    restarted since the watcher started has a new id).
    """

    def __init__(self, address: str, node_id: str | None = None):
        self.address = address
        self.node_id = node_id
        self._gcs = None

    def _client(self):
        if self._gcs is None:
            from ray._private.authentication.authentication_token_setup import (
                maybe_enable_token_auth_if_token_available,
            )
            from ray._raylet import GcsClient

            # As a driver's ray.init() does: a cluster started where a Ray token exists
            # (~/.ray/auth_token, RAY_AUTH_TOKEN) requires it; RAY_AUTH_MODE overrides.
            maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
            self._gcs = GcsClient(address=self.address)
        return self._gcs

    def __call__(self, notice: Notice) -> bool:
        from ray.core.generated import autoscaler_pb2

        gcs = self._client()
        node_id = self.node_id or local_node_id(gcs)
        accepted, why_not = gcs.drain_node(
            node_id,
            autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
            f"EC2 spot interruption: {notice.action} at {notice.time}",
            notice.deadline_ms(),
        )
        if accepted:
            log.warning("drained Ray node %s: spot %s at %s", node_id, notice.action, notice.time)
        else:
            log.error("GCS refused to drain node %s: %s", node_id, why_not)
        return bool(accepted)


def watch(imds: Imds, drain: Callable[[Notice], bool], interval: float = DEFAULT_INTERVAL_S,
          stop: threading.Event | None = None) -> Notice | None:
    """Poll until a notice is drained (returned) or `stop` is set (None)."""
    stop = stop or threading.Event()
    failing = False
    while not stop.is_set():
        try:
            notice = imds.spot_notice()
            if failing:
                log.info("instance metadata service reachable again")
                failing = False
            if notice is not None:
                log.warning("spot interruption notice: %s at %s", notice.action, notice.time)
                if drain(notice):
                    return notice
        except Exception as e:  # IMDS or GCS unreachable for a moment: keep watching
            if not failing:
                log.warning("spot watcher poll failed (will keep trying): %s", e)
            failing = True
        stop.wait(interval)
    return None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infra.spot_watcher", description=__doc__.split("\n\n")[0])
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="GCS address HOST:PORT of the cluster (default: RAY_ADDRESS)")
    p.add_argument("--node-id", help="hex id of the node to drain (default: the node on this host's IP)")
    p.add_argument("--imds-url", default=IMDS_URL, help=f"instance metadata service (default {IMDS_URL})")
    p.add_argument("--interval", type=float, default=DEFAULT_INTERVAL_S, help="seconds between polls")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if not args.address:
        p.error("--address HOST:PORT (or RAY_ADDRESS) is required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.info("watching %s%s every %gs for node %s", args.imds_url, NOTICE_PATH, args.interval,
             args.node_id or "on this host")
    notice = watch(Imds(args.imds_url), RayDrain(args.address, args.node_id), args.interval)
    return 0 if notice is not None else 1


if __name__ == "__main__":
    sys.exit(main())

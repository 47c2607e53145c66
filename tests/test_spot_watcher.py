"""infra.spot_watcher: IMDSv2 polling against a local stand-in for the metadata service,
then a real drain of a node of a real (local, multi-node) Ray cluster."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from infra.spot_watcher import Imds, Notice, watch

ROOT = Path(__file__).resolve().parents[1]
NOTICE_PATH = "/latest/meta-data/spot/instance-action"


class FakeImds:
    """IMDSv2 on 127.0.0.1: tokens from PUT /latest/api/token, a spot notice from the
    `notice_after`-th GET of instance-action on (404 before), 401 for a wrong token."""

    def __init__(self, notice_after: int = 3, action: str = "terminate", in_seconds: int = 120):
        self.notice_after = notice_after
        self.when = (datetime.now(timezone.utc) + timedelta(seconds=in_seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.action = action
        self.tokens: list[str] = []
        self.requests: list[tuple[str, str, dict]] = []
        self.notice_gets = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: bytes = b""):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self):
                with fake.lock:
                    fake.requests.append(("PUT", self.path, {k.lower(): v for k, v in self.headers.items()}))
                    if self.path != "/latest/api/token" or not self.headers.get(
                            "X-aws-ec2-metadata-token-ttl-seconds"):
                        return self._send(400)
                    fake.tokens.append(f"token-{len(fake.tokens)}")
                    return self._send(200, fake.tokens[-1].encode())

            def do_GET(self):
                with fake.lock:
                    fake.requests.append(("GET", self.path, {k.lower(): v for k, v in self.headers.items()}))
                    if not fake.tokens or self.headers.get("X-aws-ec2-metadata-token") != fake.tokens[-1]:
                        return self._send(401)
                    if self.path != NOTICE_PATH:
                        return self._send(404)
                    fake.notice_gets += 1
                    if fake.notice_gets < fake.notice_after:
                        return self._send(404)
                    return self._send(200, json.dumps({"action": fake.action, "time": fake.when}).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def revoke_tokens(self):
        with self.lock:
            self.tokens.append("revoked-by-the-test")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def test_notice_parsing():
    n = Notice("terminate", "2017-09-18T08:22:00Z")
    assert n.deadline_ms() == int(datetime(2017, 9, 18, 8, 22, tzinfo=timezone.utc).timestamp() * 1000)
    assert Notice("stop", "garbled").deadline_ms(now=1000.0) == (1000 + 120) * 1000


def test_polls_with_imdsv2_tokens_and_drains_once_on_a_notice():
    drained = []
    with FakeImds(notice_after=3) as imds:
        notice = watch(Imds(imds.url), lambda n: drained.append(n) or True, interval=0.05)
    assert drained == [notice] == [Notice("terminate", imds.when)]
    assert imds.notice_gets == 3  # two 404s (no notice) were not drains
    puts = [r for r in imds.requests if r[0] == "PUT"]
    assert len(puts) == 1  # one session token, reused
    gets = [r for r in imds.requests if r[0] == "GET"]
    assert all(h.get("x-aws-ec2-metadata-token") == "token-0" for _, _, h in gets)
    assert puts[0][2]["x-aws-ec2-metadata-token-ttl-seconds"] == "21600"


def test_gets_a_new_token_when_the_old_one_is_refused():
    with FakeImds(notice_after=10**9) as imds:
        client = Imds(imds.url)
        assert client.spot_notice() is None
        imds.revoke_tokens()
        assert client.spot_notice() is None
    assert [r[0] for r in imds.requests] == ["PUT", "GET", "GET", "PUT", "GET"]


def test_keeps_polling_through_errors_and_refused_drains():
    attempts = []

    def drain(notice):
        attempts.append(notice)
        return len(attempts) >= 2  # the GCS refuses the first time

    unreachable = Imds("http://127.0.0.1:9", timeout=0.2)  # discard port: connection refused
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    assert watch(unreachable, drain, interval=0.05, stop=stop) is None and attempts == []

    with FakeImds(notice_after=1) as imds:
        notice = watch(Imds(imds.url), drain, interval=0.05)
    assert len(attempts) == 2 and notice == attempts[-1]


def _node(gcs, node_id: str):
    for nid, info in gcs.get_all_node_info().items():
        if nid.hex() == node_id:
            return info
    raise KeyError(node_id)


def test_drains_a_real_ray_node_on_a_simulated_notice(monkeypatch):
    """Two GPU nodes (fake GPUs); an actor holds one GPU of node A. After the notice, A takes
    no new work though it has a GPU free, new work goes to B, and A ends as preempted."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster
    from ray.core.generated.common_pb2 import NodeDeathInfo
    from ray.core.generated.gcs_pb2 import GcsNodeInfo
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    tmp = tempfile.mkdtemp(dir="/tmp", prefix="ffsw")
    monkeypatch.setenv("RAY_TMPDIR", tmp)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    try:
        node_a = cluster.add_node(num_cpus=1, num_gpus=2)
        node_b = cluster.add_node(num_cpus=1, num_gpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        gcs = ray._raylet.GcsClient(address=cluster.address)

        @ray.remote(num_gpus=1, num_cpus=0)
        class Decoder:
            def node(self):
                return ray.get_runtime_context().get_node_id()

        holder = Decoder.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_a.node_id, soft=False)).remote()
        assert ray.get(holder.node.remote(), timeout=60) == node_a.node_id

        with FakeImds(notice_after=3) as imds:
            watcher = subprocess.run(
                [sys.executable, "-m", "infra.spot_watcher", "--address", cluster.address,
                 "--node-id", node_a.node_id, "--imds-url", imds.url, "--interval", "0.2"],
                cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert watcher.returncode == 0, watcher.stderr
        assert "drained Ray node " + node_a.node_id in watcher.stderr

        draining = ray._private.state.state.get_draining_nodes()
        assert draining == {node_a.node_id: Notice("terminate", imds.when).deadline_ms()}

        # Two more one-GPU actors: A has a GPU free but is draining, so one goes to B and
        # the other cannot be placed anywhere.
        new = [Decoder.remote() for _ in range(2)]
        refs = [a.node.remote() for a in new]
        ready, pending = ray.wait(refs, num_returns=1, timeout=60)
        assert ray.get(ready) == [node_b.node_id]
        ready, _ = ray.wait(pending, timeout=3)
        assert ready == []

        # A keeps running what it has; once idle its raylet exits, marked as preempted.
        assert ray.get(holder.node.remote(), timeout=30) == node_a.node_id
        ray.kill(holder)
        deadline = time.monotonic() + 60
        while _node(gcs, node_a.node_id).state != GcsNodeInfo.DEAD:
            assert time.monotonic() < deadline, "drained node did not end"
            time.sleep(0.5)
        death = _node(gcs, node_a.node_id).death_info
        assert death.reason == NodeDeathInfo.AUTOSCALER_DRAIN_PREEMPTED
        assert "spot interruption" in death.reason_message
        assert _node(gcs, node_b.node_id).state == GcsNodeInfo.ALIVE
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

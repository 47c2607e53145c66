"""infra.spot_watcher: IMDSv2 polling against a local stand-in for the metadata service,
then a real drain of a node of a real (local, multi-node) Ray cluster running the warm farm,
mid-job."""

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


def test_a_drained_farm_node_hands_its_replica_on_mid_job_without_losing_a_shard(monkeypatch, tmp_path):
    """Issue 11: the warm farm on three one-GPU nodes (the head's GPU is the spare), two
    replicas. Mid-job, a node other than the head that ran one of the job's shards gets a
    spot notice: the watcher, run as on a worker node (`python -m infra.spot_watcher`),
    drains it. The node is marked draining until the notice's time; Serve stops its replica
    at once (the notice's two minutes are shorter than the replica's graceful shutdown, so
    it takes no new shard; one running would finish, or fail and be retried) and starts a
    replacement on the spare GPU; the drained node, idle, ends as preempted. The driver is
    held (in its "done" callback) until the node is gone and the replacement is up, so
    that the rest of the job runs on the other two nodes: frame-exact, every shard once,
    some on the replacement."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster
    from ray.core.generated.common_pb2 import NodeDeathInfo
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    from actors.decoders import pattern_latents, read_index
    from actors.protocol import RenderSpec, pixel_frames
    from actors.service import WORKER, FarmConfig
    from actors.sinks import read_frames
    from cluster.driver import RenderJob
    from cluster.service import deploy, farm_status

    tmp = tempfile.mkdtemp(dir="/tmp", prefix="ffsw")
    monkeypatch.setenv("RAY_TMPDIR", tmp)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1,
                                                            "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, num_gpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        head = ray.get_runtime_context().get_node_id()
        gcs = ray._raylet.GcsClient(address=cluster.address)
        deploy(FarmConfig(capacity=2, use_gpu=True, min_replicas=2, idle_s=300))
        # The farm's ingress and ledger live on the head, whatever Serve's spread: on a drained
        # node they kept it up (a loaded run: the node still up after 300 s, actors/ledger.py).
        placed = {a["ActorClassName"].rsplit(":", 1)[-1]: a["Address"]["NodeID"]
                  for a in ray._private.state.actors().values() if a["State"] == "ALIVE"}
        assert placed["FarmIngress"] == placed["FarmLedger"] == head, placed
        drained: dict = {}

        def on_event(kind, info):
            node = info.worker.node_id if kind == "done" else head
            if node == head or drained:
                return
            with FakeImds(notice_after=2) as imds:
                watcher = subprocess.run(
                    [sys.executable, "-m", "infra.spot_watcher", "--address", cluster.address, "--node-id", node,
                     "--imds-url", imds.url, "--interval", "0.2"], cwd=ROOT, capture_output=True, text=True,
                    timeout=120)
            assert watcher.returncode == 0, watcher.stderr
            assert "drained Ray node " + node in watcher.stderr
            drained.update(node=node, at=time.time(),
                           draining=ray._private.state.state.get_draining_nodes(),
                           deadline=Notice("terminate", imds.when).deadline_ms())
            deadline = time.monotonic() + 300
            while _node(gcs, node).state != GcsNodeInfo.DEAD:
                assert time.monotonic() < deadline, f"the drained node is still up: {farm_status()}"
                time.sleep(0.5)  # polling the GCS for the node's end, with a deadline
            drained["gone"] = time.time()
            while farm_status()["deployments"][WORKER]["replicas"] != {"RUNNING": 2}:
                assert time.monotonic() < deadline, f"no replacement replica: {farm_status()}"
                time.sleep(0.5)  # polling Serve for the replacement, with a deadline
            drained["replaced"] = time.time()

        latent_frames = 25
        out = str(tmp_path / "out")
        spec = RenderSpec(output=out, decoder={"name": "test-pattern"}, shard_latents=2, device="cuda",
                          format="ffv1")
        job = RenderJob(spec, pattern_latents(latent_frames, height=240, width=320), progress=False,
                        use_farm=True, on_event=on_event)
        result = job.run()

        assert drained, "no shard ran on a node other than the head"
        assert drained["draining"] == {drained["node"]: drained["deadline"]}
        frames = read_frames(f"{out}/video.mkv", "ffv1")
        assert [read_index(f) for f in frames] == list(range(pixel_frames(latent_frames)))
        rows = sorted(result.manifest, key=lambda r: r["started"])
        assert sorted(r["shard"] for r in rows) == list(range(len(rows)))
        after = [r for r in rows if r["started"] > drained["replaced"]]
        assert after and all(r["node_id"] != drained["node"] for r in after)
        before = {r["node_id"] for r in rows if r["started"] < drained["at"]}
        assert {r["node_id"] for r in after} - before, "no shard ran on the replacement replica"
        death = _node(gcs, drained["node"]).death_info
        assert death.reason == NodeDeathInfo.AUTOSCALER_DRAIN_PREEMPTED
        assert "spot interruption" in death.reason_message
        print(f"\ndrained node {drained['node'][:8]} mid-job: the node gone {drained['gone'] - drained['at']:.1f} s and "
              f"a replacement replica up {drained['replaced'] - drained['at']:.1f} s after the drain; "
              f"{len(after)} of {len(rows)} shards ran after, on the other two nodes; "
              f"retried {result.summary['retried_shards']}; frame-exact")
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

"""GPU nodes scale 0 -> 2 -> 0 under Ray's fake multinode autoscaler (tests/fake_cluster.yaml).

The head is `ray start --head --block --autoscaling-config=...` with RAY_FAKE_CLUSTER=1,
in a session of its own (start_new_session). Its autoscaler "launches" a node by starting
another raylet on this host, from the head's monitor process, so every process the cluster
ever has - GCS, raylets of fake nodes, their workers - carries that session id, and
`FakeAutoscalingCluster.shutdown` ends exactly those, by pid. Never `ray stop` (it ends
every Ray on the host) nor ray.cluster_utils.AutoscalingCluster (which runs it). (Ray's
processes call setpgrp, never setsid; only `ray job submit` entrypoints leave the session,
and none is used here.)

Drivers run as subprocesses with RAY_ADDRESS set, as `ray job submit` would run them.
On a 2-core box each test takes about 20 s: head up ~6 s, 0 -> 2 GPU nodes and the job
~8-10 s, nodes gone ~6 s after it (idle_timeout_minutes 0.1).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
FAKE_CLUSTER_YAML = ROOT / "tests" / "fake_cluster.yaml"
RAY_WORKER_PORTS = range(10002, 20000)  # ray start's default worker port range


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        if port not in RAY_WORKER_PORTS:
            return port


def session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes whose session id is `sid`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(entry))
    return pids


def kill_session(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGKILL every process of the session `proc` leads (it was started with
    start_new_session=True, so the session id is its pid), until none is left."""
    deadline = time.monotonic() + timeout
    while True:
        pids = session_pids(proc.pid)
        if not pids:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of session {proc.pid} survived SIGKILL: {pids}")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


class FakeAutoscalingCluster:
    """A head with the fake multinode autoscaler, on free ports, in a private temp dir."""

    def __init__(self, config_path: Path = FAKE_CLUSTER_YAML):
        self.config = yaml.safe_load(config_path.read_text())
        self.tmp = tempfile.mkdtemp(dir="/tmp", prefix="ffas")  # short: Ray's socket paths
        self.proc: subprocess.Popen | None = None
        self.address = ""
        self._gcs = None

    def env(self, **extra: str) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
        # RAY_AUTH_MODE: without it, a head started where ~/.ray/auth_token exists (any
        # local ray.init() writes one) demands the token, and this process's GcsClient
        # has none.
        env.update(RAY_TMPDIR=self.tmp, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
                   PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        env.update(extra)
        return env

    def start(self, timeout: float = 120.0) -> FakeAutoscalingCluster:
        import ray._private.services
        from ray._raylet import GcsClient

        ip = ray._private.services.get_node_ip_address()
        port = free_port()
        self.address = f"{ip}:{port}"
        config = dict(self.config, provider=dict(self.config["provider"], gcs_address=self.address))
        config_path = os.path.join(self.tmp, "autoscaling.json")
        with open(config_path, "w") as f:
            json.dump(config, f)
        head = config["available_node_types"][config["head_node_type"]]["resources"]
        ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
        cmd = [ray_cli, "start", "--head", "--block", f"--port={port}", f"--temp-dir={self.tmp}",
               f"--autoscaling-config={config_path}", f"--num-cpus={head['CPU']}", f"--num-gpus={head['GPU']}",
               "--include-dashboard=true", f"--dashboard-port={free_port()}",
               f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
               "--disable-usage-stats"]
        self.log = open(os.path.join(self.tmp, "head.log"), "w")
        self.proc = subprocess.Popen(cmd, env=self.env(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1"),
                                     cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self._gcs = GcsClient(address=self.address)
                if self._gcs.get_all_node_info(timeout=2):
                    return self
            except Exception:  # GCS not up yet
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"head not up after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.5)

    def gpu_nodes(self) -> dict[str, str]:
        """{node id: market label} of alive nodes with GPUs."""
        from ray.core.generated.gcs_pb2 import GcsNodeInfo

        return {nid.hex(): info.labels.get("market", "?")
                for nid, info in self._gcs.get_all_node_info(timeout=10).items()
                if info.state == GcsNodeInfo.ALIVE and info.resources_total.get("GPU", 0) > 0}

    def wait_for_gpu_nodes(self, count: int, timeout: float) -> float:
        t0 = time.monotonic()
        while len(self.gpu_nodes()) != count:
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{len(self.gpu_nodes())} GPU nodes, not {count}, after {timeout}s\n"
                                   f"{self.log_tail('monitor')}")
            time.sleep(0.5)
        return time.monotonic() - t0

    def log_tail(self, which: str = "head", lines: int = 40) -> str:
        if which == "head":
            paths = [os.path.join(self.tmp, "head.log")]
        else:
            logs = os.path.join(self.tmp, "session_latest", "logs")
            paths = [os.path.join(logs, n) for n in ("monitor.log", "monitor.err", "monitor.out")]
        out = []
        for p in paths:
            if os.path.exists(p):
                with open(p, errors="replace") as f:
                    out.append(f"--- {p}\n" + "".join(f.readlines()[-lines:]))
        return "\n".join(out)

    def shutdown(self, keep_logs: bool = False) -> None:
        if self.proc is not None:
            kill_session(self.proc)
            self.log.close()
        if keep_logs:
            print(f"fake cluster logs kept in {self.tmp}")
            return
        for _ in range(5):  # a killed process's last files can land while the tree is removed
            shutil.rmtree(self.tmp, ignore_errors=True)
            if not os.path.exists(self.tmp):
                break
            time.sleep(0.5)


class GpuNodeSampler(threading.Thread):
    """Counts the cluster's GPU nodes twice a second while a job runs."""

    def __init__(self, cluster: FakeAutoscalingCluster):
        super().__init__(daemon=True)
        self.cluster = cluster
        self.stop = threading.Event()
        self.seen: dict[str, str] = {}
        self.most = 0

    def run(self):
        while not self.stop.wait(0.5):
            try:
                nodes = self.cluster.gpu_nodes()
            except Exception:
                continue
            self.seen.update(nodes)
            self.most = max(self.most, len(nodes))


@pytest.fixture
def fake_cluster(request):
    cluster = FakeAutoscalingCluster()
    failures_before = request.session.testsfailed
    t0 = time.monotonic()
    try:
        cluster.start()
        cluster.started_s = time.monotonic() - t0
        yield cluster
    finally:
        # Keep the cluster's logs when the test failed (the call's report is in by now).
        cluster.shutdown(keep_logs=request.session.testsfailed > failures_before)


def run_driver(cluster: FakeAutoscalingCluster, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    """A driver process connected to the cluster through RAY_ADDRESS, in its own session."""
    proc = subprocess.Popen(argv, cwd=ROOT, env=cluster.env(RAY_ADDRESS=cluster.address),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc)
        out, err = proc.communicate()
        raise AssertionError(f"driver timed out after {timeout}s\nstdout:\n{out}\nstderr:\n{err[-4000:]}\n"
                             f"{cluster.log_tail('monitor')}")
    finally:
        kill_session(proc)  # anything it left behind
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def scale_up_and_down(cluster: FakeAutoscalingCluster, argv: list[str], timeout: float):
    assert cluster.gpu_nodes() == {}, "GPU nodes before any demand: min_workers must be 0"
    sampler = GpuNodeSampler(cluster)
    sampler.start()
    t0 = time.monotonic()
    try:
        result = run_driver(cluster, argv, timeout)
    finally:
        sampler.stop.set()
        sampler.join()
    job_s = time.monotonic() - t0
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
    idle_s = cluster.wait_for_gpu_nodes(0, timeout=90)  # idle_timeout_minutes 0.1, then removal
    print(f"\nhead up {cluster.started_s:.1f} s, job {job_s:.1f} s, GPU nodes gone {idle_s:.1f} s after it; "
          f"GPU nodes seen: {sampler.seen}")
    return result, sampler


DRIVER = textwrap.dedent("""
    import json, ray
    ray.init()  # RAY_ADDRESS

    @ray.remote(num_gpus=1)
    class Gpu:
        def where(self):
            ctx = ray.get_runtime_context()
            return ctx.get_node_id(), ctx.get_accelerator_ids()["GPU"]

    workers = [Gpu.remote() for _ in range(2)]
    print("PLACED", json.dumps(ray.get([w.where.remote() for w in workers], timeout=180)))
""")


def test_gpu_actors_scale_nodes_from_zero_to_two_and_back(fake_cluster):
    result, sampler = scale_up_and_down(fake_cluster, [sys.executable, "-c", DRIVER], timeout=240)
    (line,) = [ln for ln in result.stdout.splitlines() if ln.startswith("PLACED ")]  # among autoscaler events
    placed = json.loads(line[len("PLACED "):])
    nodes = {node for node, _ in placed}
    assert len(nodes) == 2 and nodes <= set(sampler.seen)
    assert sampler.most == 2
    # On-demand first (max_workers 1 in the fake file), then its spot twin, as on AWS.
    assert sorted(sampler.seen.values()) == ["on-demand", "spot"]


@pytest.mark.autoscaler
@pytest.mark.skipif(importlib.util.find_spec("jobs.render") is None, reason="jobs/render.py not written yet")
def test_render_job_with_two_workers_scales_gpu_nodes_from_zero_to_two_and_back(fake_cluster):
    out = os.path.join(fake_cluster.tmp, "render-out")
    argv = [sys.executable, "-m", "jobs.render", "--demo", out, "--workers", "2", "--device", "cuda",
            "--demo-frames", "9", "--startup-timeout", "180"]
    result, sampler = scale_up_and_down(fake_cluster, argv, timeout=420)
    assert sampler.most == 2
    assert len(sampler.seen) == 2
    summary = json.loads(result.stdout[result.stdout.index("{"): result.stdout.rindex("}") + 1])
    assert summary["frames"] == 1 + 4 * (9 - 1)
    assert any(name.endswith(".mp4") for name in os.listdir(out)), os.listdir(out)
    # Every shard was decoded on a GPU node the autoscaler started, never on the CPU head. Which
    # of the two took which shard is the dispatcher's choice: it starts on the first worker up
    # rather than wait for the second node, so one node may decode both.
    import pyarrow.parquet as pq

    shard_nodes = pq.read_table(os.path.join(out, "manifest.parquet")).column("node_id").to_pylist()
    assert len(shard_nodes) == 2
    assert set(shard_nodes) <= set(sampler.seen), (shard_nodes, sampler.seen)


@pytest.mark.autoscaler
def test_warm_farm_scales_gpu_nodes_from_zero_around_jobs_and_back(fake_cluster):
    """The farm (no replica at rest) deployed on a cluster with no GPU node; two jobs sent to
    it bring GPU nodes up for its replicas; idle replicas (1 s) and then nodes (6 s) go."""
    outs = [os.path.join(fake_cluster.tmp, f"farm-out-{i}") for i in range(2)]
    render = [sys.executable, "-m", "jobs.render", "--demo", "--demo-frames", "9", "--device", "cuda",
              "--farm", "auto", "--shard-latents", "4"]
    script = " && ".join([
        f"{sys.executable} -m jobs.farm up --device cuda --capacity 2 --idle-s 1",
        *(" ".join(render[:4] + [out] + render[4:]) for out in outs)])
    result, sampler = scale_up_and_down(fake_cluster, ["sh", "-c", script], timeout=420)
    assert sampler.most >= 1
    import pyarrow.parquet as pq

    for out in outs:
        summary = json.loads(Path(out, "summary.json").read_text())
        assert summary["farm"] and summary["frames"] == 1 + 4 * (9 - 1)
        shard_nodes = pq.read_table(os.path.join(out, "manifest.parquet")).column("node_id").to_pylist()
        assert set(shard_nodes) <= set(sampler.seen), (shard_nodes, sampler.seen)

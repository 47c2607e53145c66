"""The warm farm (issue 11) on a real local Ray: a head with a dashboard on free ports and two
fake GPUs, the Serve application deployed on it, jobs from `ray job submit`, from driver
processes and from this process. Each test prints the figures it measured.

Order matters only in that the first test wants a cold farm: it removes any farm first.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import ray

from actors.decoders import pattern_latents, read_index
from actors.ledger import fair_share
from actors.service import WORKER, FarmConfig
from actors.sinks import read_frames
from actors.protocol import pixel_frames
from infra.staged import TMP_SUFFIX
from tests.conftest import start_job_head

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPACITY = 2


@pytest.fixture(scope="module")
def head():
    cluster, dashboard = start_job_head(num_cpus=4, num_gpus=CAPACITY, object_store_memory=200 * 2**20)
    ray.init(address=cluster.address)
    try:
        yield cluster, dashboard
    finally:
        from ray import serve

        serve.shutdown()  # this cluster's own Serve; also stops this process's handles' threads
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def warm_config(head):
    """The farm deployed once with both replicas kept up. Deploying again from a test would
    build a new version of the application and restart both replicas (about 12 s each time)."""
    from cluster.service import deploy

    deploy(FarmConfig(capacity=CAPACITY, use_gpu=True, min_replicas=CAPACITY, idle_s=300))
    return head


@pytest.fixture
def warm_farm(warm_config):
    """The farm with both replicas running: Serve replaces one an earlier test killed."""
    from cluster.service import farm_status

    deadline = time.monotonic() + 120
    while farm_status()["deployments"][WORKER]["replicas"] != {"RUNNING": CAPACITY}:
        assert time.monotonic() < deadline, farm_status()
        time.sleep(0.5)  # polling Serve for the replicas, with a deadline
    return warm_config


def exact(out: str, latent_frames: int, fmt: str = "mp4") -> bool:
    frames = read_frames(os.path.join(out, "video.mp4" if fmt == "mp4" else "video.mkv"), fmt)
    return [read_index(f) for f in frames] == list(range(pixel_frames(latent_frames)))


def summary(out: str) -> dict:
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def manifest(out: str) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(os.path.join(out, "manifest.parquet")).to_pylist()


def test_fair_share_policy():
    assert [fair_share(4, n) for n in (0, 1, 2, 3, 4, 5, 9)] == [4, 4, 2, 2, 1, 1, 1]
    assert fair_share(1, 3) == 1  # every job keeps a slot: a queued request, served in turn


def test_the_farm_s_ingress_and_ledger_import_no_torch():
    """The ingress replica and the ledger's process import only actors.ledger: with the
    decoder's imports (torch, PyAV) they took 93 s and 83 s of a cold farm's start, one after
    the other, on a loaded 2-core host."""
    code = "import sys, actors.ledger; print(sorted(m for m in ('torch', 'av', 'actors.protocol') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout


# A replica's own start-up, drawn on a job's timeline when the job waited for it.
REPLICA_STARTUP = {"process", "imports", "device"}


def test_second_submitted_job_on_a_warm_farm_starts_on_running_replicas(head, tmp_path):
    """`ray job submit` twice: the first job starts the farm (cold), the next finds it warm:
    its first shard runs on a replica already up (the job's timeline shows no start-up of that
    replica), and starts far sooner after the job's start than the cold job's did.

    "The job's start" is its driver's first step (reading its input, summary.json's
    started_at): what comes before it is the driver process starting Python and importing
    framefarm, drawn on the timeline as "driver start" and printed here, with the figures
    from Ray's own start of the job (which include it). "Starts its first shard" is the
    shard's start on its replica (the manifest's `started`).

    The time itself is a benchmark's (`benchmarks.bench_farm`; docs/benchmarks.md: 0.27-0.30 s
    to the first frame on an H200, 0.3-0.6 s on a quiet 2-core host), not this test's: beside
    two busy loops and another test module the same warm job took 4.3 and 6.4 s, where a
    driver gets a quarter of a core. Both jobs here run under the same load, so the cold
    job's start is the yardstick: it pays the replicas' start-up.
    """
    from ray.job_submission import JobStatus, JobSubmissionClient

    from benchmarks.bench_farm import breakdown
    from cluster.service import undeploy

    undeploy()  # cold: the first job starts the farm (--farm on)
    client = JobSubmissionClient(head[1])

    def submit(out: str, farm: str) -> dict:
        job = client.submit_job(entrypoint=f"cd {ROOT} && {sys.executable} -m jobs.render --demo {out} "
                                           f"--demo-frames 9 --device cuda --farm {farm}")

        async def follow():
            return "".join([lines async for lines in client.tail_job_logs(job)])

        logs = asyncio.run(follow())
        assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-3000:]
        assert exact(out, 9)
        info = client.get_job_info(job)
        figures = breakdown(out, info.start_time / 1000, info.end_time / 1000)
        s = summary(out)
        figures["first_shard_s"] = min(m["started"] for m in manifest(out)) - s["started_at"]
        with open(os.path.join(out, "timeline.json")) as f:
            spans = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
        # The start-up, if any, of the replica that ran the job's first shard (a timeline "process").
        first = min((e for e in spans if e["name"].startswith("shard ")), key=lambda e: e["ts"])
        figures["startup"] = sorted({e["name"] for e in spans
                                     if e["name"] in REPLICA_STARTUP and e["pid"] == first["pid"]})
        figures["from_ray_job_start_s"] = figures["first_shard_s"] + figures["spans_s"]["driver start"]
        return figures

    def line(name: str, f: dict) -> str:
        return (f"{name}: first shard {f['first_shard_s']:.2f} s after the job's start "
                f"({f['from_ray_job_start_s']:.2f} s after Ray started the job; driver start "
                f"{f['spans_s']['driver start']:.2f} s), job {f['job_s']:.1f} s, driver phases {f['driver_phases_s']}")

    cold = submit(str(tmp_path / "cold"), "on")
    warm = submit(str(tmp_path / "warm"), "auto")
    print("\n" + "\n".join([line("cold farm", cold), line("warm farm", warm)]))
    assert cold["farm"] and warm["farm"]
    assert cold["startup"] and not warm["startup"], (cold["startup"], warm["startup"])
    assert warm["first_shard_s"] < cold["first_shard_s"] / 3


def _driver(out: str, latent_frames: int, address: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jobs.render", "--demo", out, "--demo-frames", str(latent_frames),
           "--shard-latents", "2", "--device", "cuda", "--farm", "auto", "--format", "ffv1"]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "RAY_ADDRESS": address},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _replica_actors() -> list:
    """The farm's live replica actors, as Ray's state API describes them (ids, pids)."""
    from ray.util.state import list_actors

    return [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000, detail=True)
            if WORKER in (a.class_name or "")]


def _await_jobs(ledger, before: set, n: int, drivers: list) -> None:
    """Until n jobs beyond `before` have registered with the farm's ledger (their drivers have
    asked for a share); a driver that exits first fails the test with its output."""
    deadline = time.monotonic() + 300
    while len(set(ray.get(ledger.jobs_running.remote())["jobs"]) - before) < n:
        for d in drivers:
            assert d.poll() is None, d.communicate()[0][-3000:]
        assert time.monotonic() < deadline, f"{n} job(s) not registered with the ledger after 300 s"
        time.sleep(0.2)  # polling the ledger, with a deadline


def test_two_drivers_at_once_share_the_farm_with_shards_interleaved(warm_farm, tmp_path):
    """Two driver processes at once: the farm's fair share interleaves their shards.

    Under load one driver process can start half a minute after the other and find the farm
    free: in a loaded run the short job was done before the long one's first shard started.
    So the replicas are held (SIGSTOP) from before the first driver starts until both jobs
    have registered with the ledger; from then on the fair share decides who runs next, which
    is what this test is about. (Held long enough, Serve's health check replaces a replica and
    the calls on it are retried: the shards still interleave.)"""
    from actors.ledger import find_ledger

    cluster, _ = warm_farm
    ledger = find_ledger()
    before = set(ray.get(ledger.jobs_running.remote())["jobs"])
    outs = [str(tmp_path / "long"), str(tmp_path / "short")]
    held = [a.pid for a in _replica_actors()]
    assert len(held) == CAPACITY, held
    drivers: list = []
    try:
        for pid in held:
            os.kill(pid, signal.SIGSTOP)
        drivers.append(_driver(outs[0], 33, cluster.address))
        _await_jobs(ledger, before, 1, drivers)
        drivers.append(_driver(outs[1], 17, cluster.address))
        _await_jobs(ledger, before, 2, drivers)
    except BaseException:
        for d in drivers:
            d.kill()
        raise
    finally:
        for pid in held:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:  # replaced by Serve while held
                pass
    logs = [d.communicate(timeout=600)[0] for d in drivers]
    for d, log in zip(drivers, logs):
        assert d.returncode == 0, log[-3000:]
    assert exact(outs[0], 33, "ffv1") and exact(outs[1], 17, "ffv1")
    long, short = (sorted(manifest(o), key=lambda m: m["started"]) for o in outs)
    # Interleaved: each job had a shard start while the other still had shards to start.
    assert short[0]["started"] < long[-1]["started"] and long[0]["started"] < short[-1]["started"]
    replicas_of = {len({m["node_id"] + m["gpu_ids"] for m in rows}) for rows in (long, short)}
    print(f"\nlong job {len(long)} shards, short {len(short)}; short's first shard "
          f"{short[0]['started'] - long[0]['started']:+.1f} s after long's first, its last shard done "
          f"{long[-1]['ended'] - short[-1]['ended']:.1f} s before long's last; replicas per job {replicas_of}")


def test_replica_killed_mid_shard_costs_a_retry_not_the_job(warm_farm, tmp_path):
    from cluster.driver import RenderJob
    from actors.protocol import RenderSpec

    out = str(tmp_path / "killed")
    first_done: dict = {}
    done_event = threading.Event()

    stitcher_libraries: list[str] = []

    def on_event(kind, info):
        if kind == "stitcher":
            # What the job's stitcher process has loaded once up: it must not wait for torch
            # (docs/deploy.md, "After the last shard").
            with open(f"/proc/{info['pid']}/maps") as f:
                stitcher_libraries.extend(line.rsplit("/", 1)[-1].strip() for line in f if "/" in line)
        if kind == "done" and not done_event.is_set():
            first_done["pid"] = info.worker.pid
            done_event.set()

    spec = RenderSpec(output=out, decoder={"name": "test-pattern"}, shard_latents=2, device="cuda", format="ffv1")
    job = RenderJob(spec, pattern_latents(25, height=240, width=320), progress=False, use_farm=True,
                    on_event=on_event)
    killed: dict = {}

    def writing_a_segment(pid: int) -> bool:
        try:
            return any(os.readlink(f"/proc/{pid}/fd/{fd}").endswith(TMP_SUFFIX) for fd in os.listdir(f"/proc/{pid}/fd"))
        except OSError:  # an fd closed while listed
            return False

    def killer():
        # Once a replica's pid is known (from its first shard), wait until it has its next
        # segment open (mid-shard), then SIGKILL it.
        if not done_event.wait(300):
            return
        pid = first_done["pid"]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and job.frames_done < job.frames_total:
            if writing_a_segment(pid):
                os.kill(pid, signal.SIGKILL)
                killed["pid"] = pid
                return
            time.sleep(0.002)  # polling the process's open files for the condition, with a deadline

    watcher = threading.Thread(target=killer, daemon=True)
    watcher.start()
    result = job.run()
    watcher.join(timeout=10)
    assert killed, "the replica was never seen mid-shard"
    assert stitcher_libraries and not [name for name in stitcher_libraries if name.startswith("libtorch")]
    assert exact(out, 25, "ffv1")
    assert result.summary["retried_shards"] + result.summary["backup_wins"] >= 1  # a backup may overtake the retry
    print(f"\nkilled replica pid {killed['pid']} mid-shard; {result.summary['retried_shards']} shard(s) retried, "
          f"job {result.summary['wall_seconds']:.1f} s, frame-exact")


def _stop_when_seen(pool, slot, stopped: list) -> None:
    """SIGSTOP the replica running the pool's call in `slot`, once it has told the ledger
    (within a second or two of the call's start); its pid goes to `stopped`."""
    deadline = time.monotonic() + 120
    while (info := pool.describe(slot)) is None and time.monotonic() < deadline:
        time.sleep(0.05)  # polling the pool's view of the ledger, with a deadline
    if info is not None:
        os.kill(info.pid, signal.SIGSTOP)
        stopped.append(info.pid)


def _end_stopped(stopped: list) -> None:
    """Continue, then kill, the replicas a test stopped (Serve starts others)."""
    for pid in stopped:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def test_a_stopped_replica_s_shard_is_abandoned_after_the_stall_time_and_rerun(warm_farm, tmp_path):
    """The stall watch on the farm: a replica SIGSTOPped in its shard sends the ledger no more
    step counts; after stall_s the driver abandons the call, kills the replica (Serve starts
    another) and runs the shard again. The SIGSTOP may land mid-beat: the job's share and
    progress must still come (the ledger once froze for every job then)."""
    from cluster.driver import RenderJob
    from actors.protocol import RenderSpec

    out = str(tmp_path / "stalled")
    # Two shards of about 4 s each on an idle 2-core host: the replica is seen and stopped
    # within a second or two of its shard's start.
    spec = RenderSpec(output=out, decoder={"name": "test-pattern"}, shard_latents=500, device="cuda", format="ffv1",
                      stall_s=5, backups=False)
    events, stopped = [], []
    job = None

    def on_event(kind, info):
        events.append((kind, info))
        if kind == "dispatch" and info["shard"].index == 0 and not stopped:
            threading.Thread(target=_stop_when_seen, args=(job.pool, info["worker"], stopped), daemon=True).start()

    job = RenderJob(spec, pattern_latents(1000, height=240, width=320), progress=False, use_farm=True,
                    on_event=on_event)
    try:
        result = job.run()
    finally:
        _end_stopped(stopped)
    assert stopped, "the replica of shard 0 was never seen"
    assert [info["shard"].index for kind, info in events if kind == "stall"][:1] == [0]
    assert result.summary["stalled_shards"] >= 1 and result.summary["farm"]
    assert exact(out, 1000, "ffv1")


def test_a_withdrawn_backup_loser_on_a_replica_stops_instead_of_running_to_its_end(warm_farm, tmp_path):
    """A replica answers no call mid-shard, so a withdrawal reaches it through the ledger, at
    its next beat. Shard 0's replica is SIGSTOPped; the other replica backs the shard up and
    commits it, and the driver withdraws the stopped copy. Let go after the job, that copy must
    stop as withdrawn (ShardWithdrawn), not run on to find its segment taken (SegmentTaken)."""
    from actors.protocol import RenderSpec, ShardWithdrawn
    from cluster.dispatch import unwrap
    from cluster.driver import RenderJob
    from cluster.service import ServicePool

    class Kept(ServicePool):
        """The farm's pool, keeping the handles of the copies the driver withdraws."""

        def __init__(self):
            super().__init__()
            self.withdrawn = []

        def withdraw(self, handle, slot, run_key, shard_index):
            self.withdrawn.append(handle)
            super().withdraw(handle, slot, run_key, shard_index)

    out = str(tmp_path / "backed-up")
    # Two shards of about 4 s each on an idle 2-core host; the stall watch is far away.
    spec = RenderSpec(output=out, decoder={"name": "test-pattern"}, shard_latents=500, device="cuda", format="ffv1",
                      stall_s=600)
    stopped, pool = [], Kept()

    def on_event(kind, info):
        if kind == "dispatch" and info["shard"].index == 0 and not info["backup"] and not stopped:
            threading.Thread(target=_stop_when_seen, args=(pool, info["worker"], stopped), daemon=True).start()

    try:
        result = RenderJob(spec, pattern_latents(1000, height=240, width=320), pool=pool, progress=False,
                           on_event=on_event).run()
        assert stopped, "the replica of shard 0 was never seen"
        assert result.summary["backup_wins"] == 1 and exact(out, 1000, "ffv1")
        assert len(pool.withdrawn) == 1
        os.kill(stopped.pop(), signal.SIGCONT)
        loser = pool.withdrawn[0]
        assert loser.exception(timeout=120) is not None
        assert isinstance(unwrap(loser.exception()), ShardWithdrawn), repr(loser.exception())
    finally:
        _end_stopped(stopped)
        pool.shutdown()


def test_jobs_from_threads_at_once_a_lost_replica_and_a_cancelled_job(warm_farm, tmp_path):
    """Issue 12's shared-pool cases on the warm farm (ServicePool): jobs from several threads at
    once all finish exact; a replica SIGKILLed under them is replaced once (Serve keeps the
    deployment at its size, not one more per job that met it); cancelling one job ends none of
    another job's shards."""
    from ray import serve

    from cluster.api import JobHandle
    from cluster.dispatch import JobCancelled
    from cluster.driver import RenderJob
    from actors.protocol import RenderSpec

    def job(name: str, latent_frames: int, shard_latents: int, on_event=None) -> RenderJob:
        spec = RenderSpec(output=str(tmp_path / name), decoder={"name": "test-pattern"}, shard_latents=shard_latents,
                          device="cuda", format="ffv1")
        return RenderJob(spec, pattern_latents(latent_frames, 96, 128), progress=False, use_farm=True,
                         on_event=on_event)

    first_done, killed = threading.Event(), []

    def kill_a_replica_once(kind, info):
        if kind == "done" and not first_done.is_set():
            first_done.set()
            os.kill(info.worker.pid, signal.SIGKILL)
            killed.append(info.worker.pid)

    sizes = {"t0": 9, "t1": 11, "t2": 13}
    handles = {name: JobHandle(job(name, n, 2, kill_a_replica_once if name == "t0" else None))
               for name, n in sizes.items()}
    results = {name: h.wait(timeout=600) for name, h in handles.items()}
    assert killed and all(exact(str(tmp_path / name), n, "ffv1") for name, n in sizes.items())
    retried = sum(r.summary["retried_shards"] for r in results.values())

    def replicas() -> dict:
        return dict(serve.status().applications["framefarm"].deployments[WORKER].replica_states)

    deadline = time.monotonic() + 300
    while replicas() != {"RUNNING": CAPACITY}:  # polling Serve's state, with a deadline
        assert time.monotonic() < deadline, replicas()
        time.sleep(0.5)

    def replica_actors() -> set:
        return {a.actor_id for a in _replica_actors()}

    before_cancel = replica_actors()

    # A long job of many small shards and a short one, side by side; the long one is cancelled
    # while both have shards on the farm.
    long_running, short_running, short_events = threading.Event(), threading.Event(), []
    long_job = JobHandle(job("long", 600, 20, lambda kind, info: long_running.set() if kind == "dispatch" else None))
    assert long_running.wait(timeout=300)

    def on_short(kind, info):
        short_events.append(kind)
        if kind == "dispatch":
            short_running.set()

    short_job = JobHandle(job("short", 9, 3, on_short))
    assert short_running.wait(timeout=300)
    assert long_job.cancel(timeout=120)
    with pytest.raises(JobCancelled):
        long_job.wait(timeout=1)
    short = short_job.wait(timeout=300)
    assert "retry" not in short_events and short.summary["retried_shards"] == 0
    assert exact(str(tmp_path / "short"), 9, "ffv1")
    assert not os.path.exists(tmp_path / "long" / "video.mkv")
    print(f"\nreplica actors before the cancel {sorted(before_cancel)}, after {sorted(replica_actors())}, "
          f"states {replicas()}")
    print(f"\nthree jobs at once, replica {killed[0]} killed under them: {retried} shard(s) retried, "
          f"replicas after {replicas()}; cancelled the long job, the short one ran {len(short_events)} events, no retry")


def test_idle_farm_scales_to_zero_replicas(warm_farm):
    from ray import serve

    from cluster.service import deploy, farm_status

    def running() -> int:
        return serve.status().applications["framefarm"].deployments[WORKER].replica_states.get("RUNNING", 0)

    assert running() >= 1, farm_status()  # warm from the jobs before
    t = time.monotonic()
    deploy(FarmConfig(capacity=CAPACITY, use_gpu=True, idle_s=1))  # same farm, no minimum, a short idle time
    while running() > 0:
        assert time.monotonic() - t < 120, farm_status()
        time.sleep(0.5)
    print(f"\nidle farm at zero replicas {time.monotonic() - t:.1f} s after its idle time was set to 1 s")
    assert farm_status()["deployments"][WORKER]["replicas"].get("RUNNING", 0) == 0

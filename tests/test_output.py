"""OUTPUT's lease and its publication as a unit, without Ray: real files, real processes, and
a real S3 endpoint (moto's server over HTTP on loopback)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import boto3
import pytest
import ray

from actors.decoders import pattern_latents
from cluster.driver import OutputBusy, RenderJob, retryable
from cluster.publish import (RECORD, current_record, delete_render, is_whole, make_record, publish, render_prefix,
                             sweep)
from infra.lease import Holder, Lease, LeaseHeld, LeaseLost, lease_key
from infra.staged import TMP_SUFFIX
from infra.storage import LocalStore, S3Store
from actors.protocol import InputError, RenderSpec
from tests.s3server import AWS_ENV_TO_CLEAR, fake_aws_env, moto_server, unique_bucket

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_server() as endpoint, pytest.MonkeyPatch.context() as env:
        for k in AWS_ENV_TO_CLEAR:
            env.delenv(k, raising=False)
        for k, v in fake_aws_env(endpoint).items():
            env.setenv(k, v)
        s3 = boto3.client("s3")
        bucket = unique_bucket("out")
        s3.create_bucket(Bucket=bucket)
        yield s3, bucket


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "out")
    _, bucket = request.getfixturevalue("s3_endpoint")
    return S3Store(bucket, f"jobs/{tmp_path.name}")


def _spec(output: str, frames: int = 3, **options) -> tuple[RenderSpec, object]:
    return RenderSpec(output=output, decoder={"name": "test-pattern"}, **options), pattern_latents(frames, 16, 16)


# -- the lease ------------------------------------------------------------------------------


def test_a_second_job_is_refused_at_once_naming_the_holder(store):
    held = Lease.acquire(store, "job-a")
    with pytest.raises(LeaseHeld, match=rf"job job-a \(host {socket.gethostname()}, pid {os.getpid()}, lease renewed"):
        Lease.acquire(store, "job-b")
    held.renew()
    held.release()
    Lease.acquire(store, "job-b").release()
    assert store.list(".framefarm-lease") == []


def test_takers_of_a_stale_lease_race_and_exactly_one_wins(store):
    stale = Holder(job="gone", host="a-host-elsewhere", pid=1, pid_start=1, token="t", expires=time.time() - 5,
                   acquired=time.time() - 100)
    store.put_bytes(lease_key(3), json.dumps(stale.__dict__).encode())
    start = threading.Barrier(6)
    won, refused = [], []

    def take(i):
        start.wait()
        try:
            won.append(Lease.acquire(store, f"job-{i}"))
        except LeaseHeld as exc:
            refused.append(exc.holder.job)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 5 and set(refused) == {won[0].holder.job}
    assert won[0].generation == 4 and store.list(".framefarm-lease") == [lease_key(4)]


def test_a_holder_taken_over_after_stalling_learns_it_and_leaves_the_new_lease(store):
    first = Lease.acquire(store, "job-a")
    # It stalled past its expiry (as a SIGSTOPped driver would): its record says expired.
    store.put_bytes(lease_key(first.generation),
                    json.dumps({**first.holder.__dict__, "expires": time.time() - 1}).encode())
    second = Lease.acquire(store, "job-b")
    with pytest.raises(LeaseLost, match="taken over"):
        first.check()
    with pytest.raises(LeaseLost):
        first.renew()
    first.release()  # no-op: not its lease any more
    second.check()
    second.release()


def test_the_lease_of_a_killed_driver_is_taken_over_at_once(tmp_path):
    out = tmp_path / "out"
    code = ("import sys; from infra.lease import Lease; from infra.storage import LocalStore; "
            "Lease.acquire(LocalStore(sys.argv[1]), 'job-killed', ttl_s=3600); print('held', flush=True); "
            "sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": REPO}, text=True)
    try:
        assert proc.stdout.readline() == "held\n"
        with pytest.raises(LeaseHeld, match="job-killed"):
            Lease.acquire(LocalStore(out), "job-next")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    # An hour of lease left, but its holder is a dead process of this host: no wait.
    lease = Lease.acquire(LocalStore(out), "job-next")
    assert lease.generation == 2 and os.listdir(out) == [lease_key(2)]
    lease.release()


def test_jobs_into_a_busy_output_are_refused_before_ray_starts(tmp_path):
    out = str(tmp_path / "out")
    first = RenderJob(*_spec(out), progress=False)
    first.prepare()
    try:
        with pytest.raises(OutputBusy, match=rf"is already running into {out}: job [0-9a-f]{{16}} \(host"):
            RenderJob(*_spec(out), progress=False).prepare()
        with pytest.raises(OutputBusy, match=rf"{out} is busy: .* job {first.prepare().fingerprint}"):
            RenderJob(*_spec(out, frames=4), progress=False).prepare()
    finally:
        first.release()
    assert not ray.is_initialized()
    assert not os.path.exists(out)  # refused and released: nothing left behind


# -- refusals before Ray ---------------------------------------------------------------------


def test_an_output_that_is_or_lies_under_a_file_is_refused_before_ray(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"mine")
    for output in (blocker, blocker / "out", blocker / "deeper" / "out"):
        with pytest.raises(InputError, match=f"{output} (is|lies under) a file .*{blocker}"):
            RenderJob(*_spec(str(output)), progress=False).prepare()
    assert blocker.read_bytes() == b"mine" and os.listdir(tmp_path) == ["a-file"]
    assert not ray.is_initialized()


def test_a_missing_or_invalid_bucket_is_refused_before_ray(s3_endpoint):
    for uri, message in [("s3://no-such-bucket-here/out", "bucket 'no-such-bucket-here' does not exist"),
                         ("s3://Bad_Bucket!/out", "bad S3 bucket name"),
                         ("s3://ab/out", "bad S3 bucket name")]:
        with pytest.raises(InputError, match=message):
            RenderJob(*_spec(uri), progress=False).prepare()
    assert not ray.is_initialized()


def test_names_framefarm_did_not_write_are_never_replaced(tmp_path):
    out = tmp_path / "out"
    (out / "frames").mkdir(parents=True)
    (out / "frames" / "notes.txt").write_text("mine")
    (out / "notes.txt").write_text("mine too")
    with pytest.raises(InputError, match="holds frames, not written by this framefarm"):
        RenderJob(*_spec(str(out), format="png"), progress=False).prepare()
    assert (out / "frames" / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(out)) == ["frames", "notes.txt"]


# -- publication -----------------------------------------------------------------------------


def _write_render(store, job_id: str, video: str = "video.mp4", frames: int = 5) -> dict:
    prefix = render_prefix(job_id)
    if video == "frames":
        for i in range(frames):
            store.put_bytes(f"{prefix}/frames/{i:06d}.png", f"{job_id} {i}".encode())
    else:
        store.put_bytes(f"{prefix}/{video}", f"video of {job_id}".encode())
    for name in ("manifest.parquet", "summary.json", "timeline.json"):
        store.put_bytes(f"{prefix}/{name}", json.dumps({"render": job_id, "name": name}).encode())
    return make_record(store, job_id, video, frames)


def _shown(store) -> tuple[str, set] | None:
    """The render OUTPUT shows, checked whole, and which renders' files each name shows."""
    record = current_record(store)
    if record is None:
        return None
    assert is_whole(store, record)
    local = store.local_path(RECORD) is not None
    owners = set()
    for name in record["files"]:
        if name == "frames":
            continue
        key = name if local else f"{record['prefix']}/{name}"
        data = store.get_bytes(key)
        owners.add(json.loads(data)["render"] if name.endswith(".json") or name.endswith(".parquet")
                   else data.decode().split()[-1])
    return record["job_id"], owners


class _Crash(Exception):
    pass


def test_a_crash_at_any_step_of_publishing_leaves_one_render_whole(tmp_path, monkeypatch):
    """Publish a render over another, crashing at each filesystem step in turn: OUTPUT shows
    the old render whole or the new one whole, never a mix; the next sweep tidies up."""
    old_id, new_id = "a" * 16, "b" * 16
    steps = 0
    crashed_at = None
    while True:
        store = LocalStore(tmp_path / f"out{steps}")
        old = _write_render(store, old_id, "video.mp4")
        publish(store, old, None)
        (tmp_path / f"out{steps}" / "notes.txt").write_text("mine")
        new = _write_render(store, new_id, "frames", frames=4)
        calls = [0]

        def step(real):
            def wrapped(*args, **kwargs):
                calls[0] += 1
                if calls[0] == steps + 1:
                    raise _Crash()
                return real(*args, **kwargs)
            return wrapped

        with monkeypatch.context() as m:
            for name in ("replace", "symlink", "remove", "unlink", "rmdir"):
                m.setattr(os, name, step(getattr(os, name)))
            try:
                publish(store, new, old)
                crashed_at = None
            except _Crash:
                crashed_at = steps
        shown = _shown(store)
        assert shown in ((old_id, {old_id}), (new_id, {new_id})), (steps, shown)
        sweep(store, keep=set())
        assert _shown(store) == shown
        assert (tmp_path / f"out{steps}" / "notes.txt").read_text() == "mine"
        if crashed_at is None:
            break
        steps += 1
    assert steps > 5  # every step of the publication was tried
    assert sorted(os.listdir(tmp_path / f"out{steps}")) == sorted(
        ["frames", "manifest.parquet", "summary.json", "timeline.json", RECORD, "renders", "notes.txt"])
    assert sorted(os.listdir(tmp_path / f"out{steps}" / "renders")) == sorted(["current", new_id])


def test_s3_publishes_with_its_last_object_and_deletes_only_its_own(store):
    old = _write_render(store, "c" * 16, "frames", frames=6)
    publish(store, old, None)
    store.put_bytes(f"{render_prefix('c' * 16)}/frames/notes.txt", b"mine")
    new = _write_render(store, "d" * 16, "video.mkv")
    assert _shown(store) == ("c" * 16, {"c" * 16})  # written, not yet published
    publish(store, new, old)
    assert _shown(store) == ("d" * 16, {"d" * 16})
    left = store.list(f"{render_prefix('c' * 16)}/")
    assert left == [f"{render_prefix('c' * 16)}/frames/notes.txt"]


def test_sweep_removes_leftovers_of_killed_writers_only(store):
    kept = _write_render(store, "e" * 16)
    publish(store, kept, None)
    _write_render(store, "f" * 16)  # a render that never got published (its driver died)
    store.put_bytes("notes.txt", b"mine")
    root = store.local_path("x")
    if root is not None:
        root = os.path.dirname(root)
        os.makedirs(os.path.join(root, "segments", "j"), exist_ok=True)
        for name in (f".00001.mp4.123{TMP_SUFFIX}", f".video.mp4.abc{TMP_SUFFIX}"):
            open(os.path.join(root, "segments", "j", name), "wb").close()
        os.makedirs(os.path.join(root, f".frames.1{TMP_SUFFIX}"))
        open(os.path.join(root, f".frames.1{TMP_SUFFIX}", "000000.png"), "wb").close()
    else:
        # An upload whose process was killed: no object, but stored parts.
        client = store._client
        client.create_multipart_upload(Bucket=store.bucket, Key=f"{store.prefix}/segments/j/00001.mp4")
    removed = sweep(store, keep=set())
    assert removed
    assert _shown(store) == ("e" * 16, {"e" * 16})
    assert store.list(f"{render_prefix('f' * 16)}/") == []
    assert store.get_bytes("notes.txt") == b"mine"
    if root is not None:
        leftovers = [n for _, dirs, files in os.walk(root) for n in dirs + files if n.endswith(TMP_SUFFIX)]
        assert leftovers == []
    else:
        assert not store._client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix).get("Uploads")


def test_deleting_a_render_goes_by_its_list(store):
    record = _write_render(store, "1" * 16, "video.mp4")
    store.put_bytes(f"{render_prefix('1' * 16)}/mine.txt", b"mine")
    delete_render(store, record)
    assert store.list(f"{render_prefix('1' * 16)}/") == [f"{render_prefix('1' * 16)}/mine.txt"]


def test_errors_no_retry_can_pass_are_not_retried():
    import errno

    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    def client_error(code):
        return ClientError({"Error": {"Code": code, "Message": code}}, "PutObject")

    assert retryable(OSError(errno.ENOSPC, "disk full")) and retryable(ConnectionResetError())
    assert retryable(EndpointConnectionError(endpoint_url="http://x")) and retryable(client_error("SlowDown"))
    assert not retryable(OSError(errno.EROFS, "read-only file system"))
    for code in ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId"):
        assert not retryable(client_error(code))
    assert not retryable(NoCredentialsError())
    assert not retryable(InputError("bad latents")) and not retryable(ValueError("a bug"))

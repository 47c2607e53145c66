"""S3 input and output through a real S3 endpoint (moto's server over HTTP on loopback), and
S3 failing under a render: a TCP proxy (tests/faultproxy.py) between every framefarm process
and moto cuts or stalls the connection on cue (at a given object's upload), then restores it.
Timeouts are configured short (FRAMEFARM_S3_*), as a deployment may: a stall becomes an error
and a retry, with a line in the log, never a silent wait.

Frames are checked by the test pattern's indices; OUTPUT by its exact list of keys: the
previous render whole until a new one is published, and no scratch objects (segments,
leases, unfinished multipart uploads) after a render that ends well. One Ray, one moto
server, one proxy and one pool of decode workers (a Farm) serve every test here.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import threading
import time
from urllib.parse import urlparse

import boto3
import pytest
import ray
from safetensors.torch import save_file

from actors.decoders import pattern_latents, read_index
from actors.protocol import pixel_frames
from actors.sinks import read_frames
from cluster.api import Farm, render, submit
from infra.lease import Lease, LeaseLost, Renewer
from infra.storage import S3Store, S3Timeouts
from tests.conftest import tiny_latents
from tests.faultproxy import FaultProxy
from tests.s3server import AWS_ENV_TO_CLEAR, fake_aws_env, moto_server, unique_bucket

PATTERN = {"decoder": {"name": "test-pattern"}, "progress": False}
# Short enough that a stall costs seconds here, long enough for moto on a loaded 2-core host.
TIMEOUTS = {"FRAMEFARM_S3_CONNECT_TIMEOUT_S": "5", "FRAMEFARM_S3_READ_TIMEOUT_S": "5",
            "FRAMEFARM_S3_MAX_ATTEMPTS": "3"}


@pytest.fixture(scope="module")
def s3_behind_proxy():
    """moto's server, the proxy in front of it, a local Ray whose processes reach S3 only
    through the proxy (they inherit the endpoint, dummy keys and the short timeouts), and a
    Farm of two CPU decode workers that the renders here share."""
    saved = {k: os.environ.get(k) for k in (*AWS_ENV_TO_CLEAR, *fake_aws_env("x"), *TIMEOUTS)}
    with moto_server() as endpoint:
        host, port = urlparse(endpoint).hostname, urlparse(endpoint).port
        with FaultProxy((host, port)) as proxy:
            for k in AWS_ENV_TO_CLEAR:
                os.environ.pop(k, None)
            os.environ.update({**fake_aws_env(proxy.url), **TIMEOUTS})
            ray.init(address="local", num_cpus=3, num_gpus=0, include_dashboard=False,
                     object_store_memory=200 * 2**20)
            farm = None
            try:
                admin = boto3.client("s3", endpoint_url=endpoint)  # straight to moto: the test's own view
                bucket = unique_bucket("ff")
                admin.create_bucket(Bucket=bucket)
                farm = Farm(workers=2, device="cpu")
                yield proxy, admin, bucket, farm
            finally:
                if farm is not None:
                    farm.close()
                ray.shutdown()
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v


@pytest.fixture
def proxy(s3_behind_proxy):
    proxy = s3_behind_proxy[0]
    proxy.reset()
    yield proxy
    proxy.reset()


def _keys(admin, bucket: str, prefix: str) -> list[str]:
    pages = admin.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", ()))


def _published(admin, bucket: str, out: str) -> dict:
    return json.loads(admin.get_object(Bucket=bucket, Key=f"{out}/render.json")["Body"].read())


def _indices(admin, bucket: str, out: str, tmp_path) -> list[int]:
    """The frames OUTPUT shows (a PNG render's), by their test-pattern indices."""
    record = _published(admin, bucket, out)
    summary = json.loads(admin.get_object(Bucket=bucket, Key=f"{out}/{record['prefix']}/summary.json")["Body"].read())
    folder = tmp_path / f"frames-{record['job_id']}"
    folder.mkdir(exist_ok=True)
    for key in _keys(admin, bucket, f"{out}/{summary['video']}/"):
        admin.download_file(bucket, key, str(folder / key.rsplit("/", 1)[1]))
    return [read_index(f) for f in read_frames(str(folder), "png")]


def _segment_upload(bucket: str, out: str, shard: bytes = rb"\d+") -> bytes:
    return rb"PUT /" + bucket.encode() + b"/" + out.encode() + rb"/segments/\w+/" + shard + rb"_\S+\.tar "


def _frame_upload(bucket: str, out: str) -> bytes:
    return rb"PUT /" + bucket.encode() + b"/" + out.encode() + rb"/renders/\w+/frames/\d+\.png "


def test_a_stalled_request_times_out_and_is_retried_with_a_log_line(s3_behind_proxy, proxy, caplog):
    """No silent wait: each try that gets no answer in read_s fails, is logged and tried again;
    once S3 answers, the call succeeds; a stall longer than every try is an error, not a hang."""
    _, admin, bucket, _ = s3_behind_proxy
    # Patient enough that the try after the first timeout is still waiting when S3 comes back,
    # however slowly this host wakes the test; then one that gives up after two short tries.
    patient = S3Store(bucket, "stall", endpoint_url=proxy.url,
                      timeouts=S3Timeouts(connect_s=1, read_s=1, max_attempts=6))
    store = S3Store(bucket, "stall", endpoint_url=proxy.url,
                    timeouts=S3Timeouts(connect_s=1, read_s=1, max_attempts=2))
    caplog.set_level(logging.WARNING, logger="infra.storage")
    outcome: dict = {}

    def put(key: str):
        try:
            (patient if key == "a" else store).put_bytes(key, b"frames")
            outcome[key] = "ok"
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            outcome[key] = exc

    proxy.stall()
    t = threading.Thread(target=put, args=("a",))
    t.start()
    proxy.wait_until(lambda s: s.held >= 2)  # the first try timed out and a second one came
    proxy.restore()
    t.join(timeout=60)
    assert outcome == {"a": "ok"} and store.get_bytes("a") == b"frames"
    assert any("S3 PutObject" in r.message and "try 1 of 6; retrying" in r.message for r in caplog.records)

    proxy.stall()  # for good: every try times out
    t = threading.Thread(target=put, args=("b",))
    t.start()
    t.join(timeout=60)
    assert not t.is_alive() and "timeout" in str(outcome["b"]).lower()
    assert any("try 2 of 2; giving up" in r.message for r in caplog.records)
    proxy.restore()  # (the held tries may still land now, as over a real network: keys are idempotent)

    # Cut: botocore's error keeps the request and its open body; the store's error pickles
    # (a worker's must reach the driver as itself, not as Ray's multi-line stand-in).
    proxy.cut()
    with pytest.raises(Exception) as cut:
        store.put_bytes("c", b"frames")
    back = pickle.loads(pickle.dumps(cut.value))
    assert type(back) is type(cut.value) and str(back) == str(cut.value) and proxy.url in str(back)


def test_a_lease_that_cannot_be_renewed_is_given_up_by_its_expiry(s3_behind_proxy, proxy):
    """S3 cut under a running job: its lease renewal fails, is retried, and the job is told to
    stop once the lease would expire (another job may then take OUTPUT over)."""
    _, _, bucket, _ = s3_behind_proxy
    store = S3Store(bucket, "leased", endpoint_url=proxy.url,
                    timeouts=S3Timeouts(connect_s=1, read_s=1, max_attempts=2))
    lease = Lease.acquire(store, "job-a", ttl_s=4)
    lost, seen = threading.Event(), []
    renewer = Renewer(lease, lambda exc: (seen.append((time.time(), exc)), lost.set()))
    try:
        proxy.wait_until(lambda s: s.requests >= 3)  # acquired, then renewed through the proxy
        cut_at = time.time()
        proxy.cut()
        assert lost.wait(timeout=60)
    finally:
        renewer.stop()
    when, exc = seen[0]
    assert isinstance(exc, LeaseLost) and "could not renew the lease" in str(exc)
    assert when - cut_at < lease.ttl_s + 10  # by its expiry, give or take a try on a loaded host


def test_s3_stalled_then_cut_mid_render_a_rerun_ends_exact_and_leaves_no_scratch(s3_behind_proxy, proxy, tmp_path):
    """PNG renders, whose frames are many objects: the issue's case of a re-render that failed
    mid-upload leaving new frames beside old ones. B is shorter than A: none of A's frames may
    stay beside B's."""
    _, admin, bucket, farm = s3_behind_proxy
    out, uri = "out", f"s3://{bucket}/out"
    job_b = {"shard_latents": 2, "overwrite": True, "format": "png", "decoder": {"name": "test-pattern"}, "farm": farm}
    # A: S3 stalls at the upload of shard 1's segment, for longer than a request may wait; the
    # upload times out, is tried again, and once S3 answers the render ends exact.
    proxy.on_request(_segment_upload(bucket, out, shard=b"00001"), "stall")
    held = threading.Event()

    def restore_after_a_retry():
        proxy.wait_until(lambda s: s.matched >= 2)  # the stalled upload, tried again
        held.set()
        proxy.restore()

    restorer = threading.Thread(target=restore_after_a_retry, daemon=True)
    restorer.start()
    render(pattern_latents(13, 96, 128), uri, shard_latents=2, format="png", farm=farm, **PATTERN)
    restorer.join(timeout=10)
    assert held.is_set()
    first = _published(admin, bucket, out)
    assert _indices(admin, bucket, out, tmp_path) == list(range(pixel_frames(13)))
    first_keys = _keys(admin, bucket, f"{out}/{first['prefix']}/")

    # B: S3 cut for good, first at a worker's upload of its second segment, then (B again)
    # at the stitcher's upload of the fifth frame of the video, then (B once more) at the
    # driver's upload of render.json, the commit point of a publication. Each time the job
    # fails in bounded time with one line that names the endpoint (the CLI prints it after
    # "framefarm: job failed:"), and A stays published and whole.
    publication = rb"PUT /" + bucket.encode() + b"/" + out.encode() + rb"/render\.json "
    for where, nth in ((_segment_upload(bucket, out), 2), (_frame_upload(bucket, out), 5), (publication, 1)):
        proxy.reset()
        proxy.on_request(where, "cut", nth=nth)
        with pytest.raises(Exception) as failed:
            submit(pattern_latents(5, 96, 128), uri, max_attempts=2, **job_b).wait(timeout=300)
        line = f"{type(failed.value).__name__}: {failed.value}"
        print(f"\njob B, S3 cut at {where.decode()!r}, failed with: {line}")
        assert proxy.stats.shut + proxy.stats.refused > 0  # the cut was met
        assert "\n" not in line and proxy.url in line and "ray::" not in line
        proxy.restore()
        assert _published(admin, bucket, out) == first
        assert _keys(admin, bucket, f"{out}/{first['prefix']}/") == first_keys
        assert _indices(admin, bucket, out, tmp_path) == list(range(pixel_frames(13)))

    # B again from this process at once, S3 whole (the lease B could not delete is no longer
    # held: no wait for its expiry). Segments committed before the cuts are reused, the frames
    # are exact, and OUTPUT holds B's render and nothing else: A's files, B's segments and
    # half-uploaded frames, the lease, unfinished uploads all gone.
    committed = [k for k in _keys(admin, bucket, f"{out}/segments/") if k.endswith(".json")]
    assert _keys(admin, bucket, f"{out}/.framefarm-lease.")  # B's, left live-looking by the cut
    result = submit(pattern_latents(5, 96, 128), uri, **job_b).wait(timeout=300)
    assert result.summary["reused_shards"] == len(committed) > 0
    assert _indices(admin, bucket, out, tmp_path) == list(range(pixel_frames(5)))
    prefix = f"{out}/{_published(admin, bucket, out)['prefix']}"
    assert _keys(admin, bucket, f"{out}/") == sorted(
        [f"{out}/render.json"] + [f"{prefix}/{name}" for name in
                                  ("manifest.parquet", "summary.json", "timeline.json", "render.json")]
        + [f"{prefix}/frames/{i:06d}.png" for i in range(pixel_frames(5))])
    assert not admin.list_multipart_uploads(Bucket=bucket, Prefix=f"{out}/").get("Uploads")


def test_s3_latents_to_s3_video(s3_behind_proxy, tmp_path):
    _, s3, bucket, farm = s3_behind_proxy
    t = 13
    save_file({"latents": pattern_latents(t, 96, 128)}, tmp_path / "in.safetensors")
    s3.upload_file(str(tmp_path / "in.safetensors"), bucket, "inputs/clip.safetensors")
    out = f"s3://{bucket}/renders/clip"
    result = render(f"s3://{bucket}/inputs/clip.safetensors", out, decoder={"name": "test-pattern"},
                    format="mp4", shard_latents=4, farm=farm, keep_segments=True, progress=False)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="renders/clip/")["Contents"]}
    # render.json, written last, publishes the render; its files live under its own prefix.
    record = json.loads(s3.get_object(Bucket=bucket, Key="renders/clip/render.json")["Body"].read())
    render_keys = {f"renders/clip/{record['prefix']}/{name}" for name in
                   ("video.mp4", "manifest.parquet", "summary.json", "timeline.json", "render.json")}
    assert render_keys <= keys and result.summary["video"] == f"{record['prefix']}/video.mp4"
    assert sum(k.startswith("renders/clip/segments/") and k.endswith(".mp4") for k in keys) == 4
    assert keys - render_keys - {"renders/clip/render.json"} == {k for k in keys if "/segments/" in k}
    s3.download_file(bucket, f"renders/clip/{result.summary['video']}", str(tmp_path / "video.mp4"))
    frames = read_frames(str(tmp_path / "video.mp4"), "mp4")
    assert [read_index(f) for f in frames] == list(range(pixel_frames(t)))
    summary = json.loads(s3.get_object(Bucket=bucket, Key=f"renders/clip/{record['prefix']}/summary.json")["Body"].read())
    assert summary["frames"] == pixel_frames(t) == result.summary["frames"]
    assert summary["render"] == record["job_id"] == summary["job_id"]


def test_weights_from_s3(s3_behind_proxy, tiny_wan_dir, tmp_path):
    _, s3, bucket, farm = s3_behind_proxy
    for name in os.listdir(tiny_wan_dir):
        s3.upload_file(os.path.join(tiny_wan_dir, name), bucket, f"models/tiny-wan/{name}")
    from actors.colour import to_uint8_frames
    from actors.wan import load_wan_decoder

    import numpy as np

    latents = tiny_latents(5, seed=9)
    reference = np.concatenate([to_uint8_frames(c).numpy() for c in load_wan_decoder(tiny_wan_dir).stream(latents)])
    out = str(tmp_path / "out")
    render(latents, out, decoder={"name": "wan2.1", "weights": f"s3://{bucket}/models/tiny-wan"}, format="ffv1",
           farm=farm, progress=False)
    np.testing.assert_array_equal(read_frames(os.path.join(out, "video.mkv"), "ffv1"), reference)


def test_missing_s3_latents_is_a_clear_error(s3_behind_proxy):
    from actors.protocol import InputError

    _, _, bucket, _ = s3_behind_proxy
    with pytest.raises(InputError, match="no such latents file"):
        render(f"s3://{bucket}/nope.safetensors", f"s3://{bucket}/out", decoder={"name": "test-pattern"},
               progress=False)


def test_no_gpu_for_a_gpu_job_is_said_not_waited_for(s3_behind_proxy, tmp_path):
    """This module's Ray has no GPU: a job asking for GPU workers ends with what to check."""
    from cluster.dispatch import NoWorkersError
    from cluster.driver import RenderJob
    from actors.protocol import RenderSpec

    spec = RenderSpec(output=str(tmp_path / "out"), decoder={"name": "test-pattern"}, device="cuda", workers=1)
    with pytest.raises(NoWorkersError, match=r"each needs 1 GPU.*ray status"):
        RenderJob(spec, pattern_latents(3, 96, 128), progress=False, startup_timeout_s=3).run()
    assert not (tmp_path / "out").exists()


def test_cancel_while_waiting_for_gpu_workers_ends_the_job(s3_behind_proxy, tmp_path):
    """This module's Ray has no GPU, so a GPU job waits for workers; a cancel ends that wait."""
    from cluster.api import JobHandle
    from cluster.dispatch import JobCancelled
    from cluster.driver import RenderJob
    from actors.protocol import RenderSpec

    spec = RenderSpec(output=str(tmp_path / "out"), decoder={"name": "test-pattern"}, device="cuda", workers=1)
    handle = JobHandle(RenderJob(spec, pattern_latents(3, 96, 128), progress=False, startup_timeout_s=600))
    assert handle.cancel(timeout=60)  # ended, not 600 s of waiting for an autoscaler
    with pytest.raises(JobCancelled):
        handle.wait(timeout=1)
    assert not (tmp_path / "out" / "video.mp4").exists()

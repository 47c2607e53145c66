"""S3 input and output through a real S3 endpoint (moto's server over HTTP on loopback)."""

from __future__ import annotations

import json
import os

import boto3
import pytest
import ray
from safetensors.torch import save_file

from actors.decoders import pattern_latents, read_index
from actors.sinks import read_frames
from cluster.api import render
from actors.protocol import pixel_frames
from tests.s3server import AWS_ENV_TO_CLEAR, fake_aws_env, moto_server, unique_bucket
from tests.conftest import tiny_latents


@pytest.fixture(scope="module")
def s3_ray():
    """A moto endpoint, then a local Ray whose workers inherit the endpoint and dummy keys."""
    saved = {k: os.environ.get(k) for k in (*AWS_ENV_TO_CLEAR, *fake_aws_env("x"))}
    with moto_server() as endpoint:
        for k in AWS_ENV_TO_CLEAR:
            os.environ.pop(k, None)
        os.environ.update(fake_aws_env(endpoint))
        ray.init(address="local", num_cpus=3, num_gpus=0, include_dashboard=False,
                 object_store_memory=200 * 2**20)
        try:
            s3 = boto3.client("s3")
            bucket = unique_bucket("ff")
            s3.create_bucket(Bucket=bucket)
            yield s3, bucket
        finally:
            ray.shutdown()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def test_s3_latents_to_s3_video(s3_ray, tmp_path):
    s3, bucket = s3_ray
    t = 13
    save_file({"latents": pattern_latents(t, 96, 128)}, tmp_path / "in.safetensors")
    s3.upload_file(str(tmp_path / "in.safetensors"), bucket, "inputs/clip.safetensors")
    out = f"s3://{bucket}/renders/clip"
    result = render(f"s3://{bucket}/inputs/clip.safetensors", out, decoder={"name": "test-pattern"},
                    format="mp4", shard_latents=4, workers=2, keep_segments=True, progress=False)
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


def test_png_to_s3_rerendered_shorter_leaves_no_stale_frames(s3_ray):
    s3, bucket = s3_ray
    out = f"s3://{bucket}/renders/png"
    for t in (3, 2):  # 9 frames, then 5 under the same name
        result = render(pattern_latents(t, 96, 128), out, decoder={"name": "test-pattern"}, format="png",
                        workers=2, progress=False, overwrite=True)
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="renders/png/")["Contents"])
    frames = f"renders/png/{result.summary['video']}"
    assert [k for k in keys if "/frames/" in k] == [f"{frames}/{i:06d}.png" for i in range(pixel_frames(2))]
    assert len({k.split("/")[3] for k in keys if k.startswith("renders/png/renders/")}) == 1  # the first render went


def test_weights_from_s3(s3_ray, tiny_wan_dir, tmp_path):
    s3, bucket = s3_ray
    for name in os.listdir(tiny_wan_dir):
        s3.upload_file(os.path.join(tiny_wan_dir, name), bucket, f"models/tiny-wan/{name}")
    from actors.colour import to_uint8_frames
    from actors.wan import load_wan_decoder

    import numpy as np

    latents = tiny_latents(5, seed=9)
    reference = np.concatenate([to_uint8_frames(c).numpy() for c in load_wan_decoder(tiny_wan_dir).stream(latents)])
    out = str(tmp_path / "out")
    render(latents, out, decoder={"name": "wan2.1", "weights": f"s3://{bucket}/models/tiny-wan"}, format="ffv1",
           workers=1, progress=False)
    np.testing.assert_array_equal(read_frames(os.path.join(out, "video.mkv"), "ffv1"), reference)


def test_missing_s3_latents_is_a_clear_error(s3_ray):
    from actors.protocol import InputError

    _, bucket = s3_ray
    with pytest.raises(InputError, match="no such latents file"):
        render(f"s3://{bucket}/nope.safetensors", f"s3://{bucket}/out", decoder={"name": "test-pattern"},
               progress=False)


def test_no_gpu_for_a_gpu_job_is_said_not_waited_for(s3_ray, tmp_path):
    """This module's Ray has no GPU: a job asking for GPU workers ends with what to check."""
    from cluster.dispatch import NoWorkersError
    from cluster.driver import RenderJob
    from actors.protocol import RenderSpec

    spec = RenderSpec(output=str(tmp_path / "out"), decoder={"name": "test-pattern"}, device="cuda", workers=1)
    with pytest.raises(NoWorkersError, match=r"each needs 1 GPU.*ray status"):
        RenderJob(spec, pattern_latents(3, 96, 128), progress=False, startup_timeout_s=3).run()
    assert not (tmp_path / "out").exists()


def test_cancel_while_waiting_for_gpu_workers_ends_the_job(s3_ray, tmp_path):
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

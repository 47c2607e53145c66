"""Credentials and permissions are checked before any work: exit 2, the URI, how to fix it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from cluster.driver import prepare
from infra.storage import AccessError, check_access
from actors.protocol import RenderSpec
from tests.s3server import AWS_ENV_TO_CLEAR, fake_aws_env, moto_server, unique_bucket

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _no_credentials(env: dict, endpoint: str) -> dict:
    env = {k: v for k, v in env.items() if k not in AWS_ENV_TO_CLEAR}
    env.update(fake_aws_env(endpoint))
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    return env


@pytest.fixture(scope="module")
def endpoint():
    with moto_server() as url:
        yield url


def test_s3_output_without_credentials_is_refused_before_ray(endpoint, tmp_path):
    import boto3

    bucket = unique_bucket("creds")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in fake_aws_env(endpoint).items():
            mp.setenv(key, value)
        boto3.session.Session().client("s3").create_bucket(Bucket=bucket)
    out = f"s3://{bucket}/renders/a"
    env = _no_credentials(dict(os.environ), endpoint)
    proc = subprocess.run([sys.executable, "-m", "jobs.render", "--demo", out], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"framefarm: error: {out}: no AWS credentials") and "AWS_PROFILE" in last, last
    assert "instance role" in last and "Traceback" not in proc.stderr
    assert "Ray instance" not in proc.stderr  # refused before Ray was started
    with pytest.MonkeyPatch.context() as mp:
        for key, value in fake_aws_env(endpoint).items():
            mp.setenv(key, value)
        listed = boto3.session.Session().client("s3").list_objects_v2(Bucket=bucket)
    assert listed.get("KeyCount", 0) == 0


def test_s3_latents_and_weights_without_credentials_are_refused(endpoint, tmp_path, monkeypatch):
    for key in AWS_ENV_TO_CLEAR + ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key, raising=False)
    for key, value in _no_credentials({}, endpoint).items():
        monkeypatch.setenv(key, value)
    out = str(tmp_path / "out")
    spec = RenderSpec(latents="s3://b/z.safetensors", output=out, decoder={"name": "test-pattern"})
    with pytest.raises(AccessError, match=r"^s3://b/z.safetensors: no AWS credentials.*AWS_PROFILE"):
        prepare(spec)
    spec = RenderSpec(latents=str(tmp_path / "z.npy"), output=out,
                      decoder={"name": "wan2.1", "weights": "s3://b/models/vae"})
    with pytest.raises(AccessError, match=r"^s3://b/models/vae: no AWS credentials"):
        prepare(spec)
    assert not (tmp_path / "out").exists()
    # With credentials the same URIs pass the check (the object store answers the rest).
    for key, value in fake_aws_env(endpoint).items():
        monkeypatch.setenv(key, value)
    check_access("s3://b/models/vae")
    check_access("s3://b/renders/a", write=True)


# As root (CI here) every folder is writable: the command then drops to `nobody` once its
# modules are imported (the interpreter itself lies under root's home, which nobody may read).
AS_NOBODY = ("import os, sys; import jobs.render, cluster.api, cluster.driver, actors.decoders; "
             "os.setgroups([]); os.setegid(65534); os.seteuid(65534); sys.exit(jobs.render.main(sys.argv[1:]))")


def test_unwritable_output_folder_is_refused_before_ray():
    as_root = os.geteuid() == 0
    base = tempfile.mkdtemp(prefix="ff-ro-")
    try:
        os.chmod(base, 0o755 if as_root else 0o555)
        out = os.path.join(base, "renders", "a")
        argv = ["-c", AS_NOBODY] if as_root else ["-m", "jobs.render"]
        proc = subprocess.run([sys.executable, *argv, "--demo", out], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 2, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"framefarm: error: {out}: the folder {base}") and "not writable" in last, last
        assert "Ray instance" not in proc.stderr and os.listdir(base) == []
    finally:
        os.chmod(base, 0o755)
        shutil.rmtree(base, ignore_errors=True)

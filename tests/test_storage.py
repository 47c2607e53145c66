"""The storage layer, against the local filesystem and a real S3 endpoint (moto's
standalone server over HTTP on 127.0.0.1; never the in-process mock)."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from infra.storage import (
    MiB,
    LocalStore,
    ObjectStore,
    S3Store,
    download_prefix,
    is_s3,
    open_store,
    read_uri_bytes,
    split_uri,
)
from tests.s3server import AWS_ENV_TO_CLEAR, fake_aws_env, moto_server, unique_bucket

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def aws_env(monkeypatch, s3_endpoint):
    """Dummy credentials, the test server as the S3 endpoint, ~/.aws out of reach."""
    for name in AWS_ENV_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    for name, value in fake_aws_env(s3_endpoint).items():
        monkeypatch.setenv(name, value)
    return s3_endpoint


@pytest.fixture(scope="session")
def admin_client(s3_endpoint):
    """For test setup only; one per session because building a client costs ~0.3 s."""
    import boto3

    return boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    ).client("s3", endpoint_url=s3_endpoint)


@pytest.fixture
def bucket(aws_env, admin_client):
    name = unique_bucket("storage")
    admin_client.create_bucket(Bucket=name)
    return name


def _s3_store(bucket: str) -> S3Store:
    # Below the default threshold so an 11 MiB file goes multipart; 5 MiB is S3's
    # smallest allowed part.
    return S3Store(bucket, "runs/r1", multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return _s3_store(request.getfixturevalue("bucket"))


def _payload(n: int) -> bytes:
    return (bytes(range(256)) * (n // 256 + 1))[:n]


def _stray_temps(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if "framefarm-tmp" in p.name]


# ---------------------------------------------------------------------------------------
# Behaviour shared by both stores


def test_bytes_round_trip(store):
    store.put_bytes("a/b.bin", b"hello")
    assert store.get_bytes("a/b.bin") == b"hello"
    store.put_bytes("a/b.bin", bytearray(b"again"))  # overwrite
    assert store.get_bytes("a/b.bin") == b"again"
    store.put_bytes("empty", b"")
    assert store.get_bytes("empty") == b""
    assert store.size("empty") == 0


def test_file_round_trip(store, tmp_path):
    src = tmp_path / "src.bin"
    data = _payload(300_000)
    src.write_bytes(data)
    store.put_file(src, "seg/000.mp4")
    out = tmp_path / "out" / "deep" / "000.mp4"  # parents are created
    store.get_file("seg/000.mp4", out)
    assert out.read_bytes() == data
    assert _stray_temps(tmp_path) == []


def test_large_file_round_trip_uses_multipart_on_s3(store, tmp_path):
    src = tmp_path / "big.bin"
    data = os.urandom(11 * MiB)
    src.write_bytes(data)
    store.put_file(str(src), "big.bin")
    assert store.size("big.bin") == len(data)
    if isinstance(store, S3Store):
        head = store._client.head_object(Bucket=store.bucket, Key=f"{store.prefix}/big.bin")
        # A multipart object's ETag is "<md5 of part md5s>-<part count>".
        assert head["ETag"].strip('"').endswith("-3")
    out = tmp_path / "big.out"
    store.get_file("big.bin", out)
    assert out.read_bytes() == data
    assert store.get_bytes("big.bin") == data


def test_list_prefixes_and_sorting(store):
    keys = ["c", "a/2", "ab", "a/sub/3", "b/x", "a/1"]
    for k in keys:
        store.put_bytes(k, k.encode())
    assert store.list() == sorted(keys)
    assert store.list("a/") == ["a/1", "a/2", "a/sub/3"]
    assert store.list("a") == ["a/1", "a/2", "a/sub/3", "ab"]  # a string prefix
    assert store.list("a/s") == ["a/sub/3"]
    assert store.list("a/sub/") == ["a/sub/3"]
    assert store.list("nope/") == []
    assert store.list("zzz") == []


def test_list_many_keys(store):
    # One key more than an S3 page (1000 keys) so pagination is exercised.
    keys = [f"k/{i:05d}" for i in range(1001)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: store.put_bytes(k, b"x"), keys))
    assert store.list("k/") == keys


def test_exists_size_delete(store):
    assert not store.exists("x/y")
    store.put_bytes("x/y", b"12345")
    assert store.exists("x/y")
    assert store.size("x/y") == 5
    assert not store.exists("x")  # a "directory" is not an object
    store.delete("x/y")
    assert not store.exists("x/y")
    assert store.list() == []
    store.delete("x/y")  # deleting what is gone is not an error


def test_missing_key_is_file_not_found_naming_uri(store, tmp_path):
    uri = store.uri_for("no/such")
    for call in (
        lambda: store.get_bytes("no/such"),
        lambda: store.get_file("no/such", tmp_path / "dst"),
        lambda: store.size("no/such"),
    ):
        with pytest.raises(FileNotFoundError, match="no/such") as info:
            call()
        assert info.value.filename == uri
    assert not (tmp_path / "dst").exists()
    assert _stray_temps(tmp_path) == []


@pytest.mark.parametrize("key", ["", "../x", "a/../../x", "/etc/passwd", "a//b", "./a", "a/."])
def test_keys_escaping_root_rejected(store, key):
    with pytest.raises(ValueError):
        store.put_bytes(key, b"x")
    with pytest.raises(ValueError):
        store.get_bytes(key)
    with pytest.raises(ValueError):
        store.exists(key)
    with pytest.raises(ValueError):
        store.delete(key)


def test_list_prefix_escaping_root_rejected(store):
    with pytest.raises(ValueError):
        store.list("../")
    with pytest.raises(ValueError):
        store.list("/etc/")


def test_stores_pickle(store):
    # Ray ships stores to workers; an S3 store rebuilds its client on arrival.
    assert isinstance(store, ObjectStore)
    store.put_bytes("p", b"payload")
    clone = pickle.loads(pickle.dumps(store))
    assert clone == store
    assert clone.get_bytes("p") == b"payload"


def test_uri_helpers(store, tmp_path):
    store.put_bytes("weights/vae/config.json", b"{}")
    store.put_bytes("weights/vae/sub/w.safetensors", b"w" * 1000)
    store.put_bytes("weights/vae2/other", b"no")
    store.put_bytes("latents.pt", b"LAT")

    assert read_uri_bytes(store.uri_for("latents.pt")) == b"LAT"

    dest = tmp_path / "weights"
    written = download_prefix(store.uri + "/weights/vae", dest)
    assert sorted(written) == [str(dest / "config.json"), str(dest / "sub" / "w.safetensors")]
    assert (dest / "sub" / "w.safetensors").read_bytes() == b"w" * 1000
    assert not (dest / "other").exists()

    with pytest.raises(FileNotFoundError):
        read_uri_bytes(store.uri_for("nope.pt"))
    with pytest.raises(FileNotFoundError):
        download_prefix(store.uri + "/empty", tmp_path / "nothing")


# ---------------------------------------------------------------------------------------
# Local store specifics


def test_local_put_is_atomic(tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "store")
    store.put_bytes("seg/0.mp4", b"old")
    src = tmp_path / "src"
    src.write_bytes(b"n" * 100_000)

    def copy_half_then_fail(fsrc, fdst, length=0):
        fdst.write(fsrc.read(50_000))
        raise OSError("disk on fire")

    monkeypatch.setattr(shutil, "copyfileobj", copy_half_then_fail)
    with pytest.raises(OSError, match="disk on fire"):
        store.put_file(src, "seg/0.mp4")
    with pytest.raises(OSError, match="disk on fire"):
        store.put_file(src, "seg/1.mp4")
    assert store.get_bytes("seg/0.mp4") == b"old"
    assert not store.exists("seg/1.mp4")
    assert store.list() == ["seg/0.mp4"]
    assert _stray_temps(tmp_path) == []


def test_local_list_hides_in_progress_writes(tmp_path):
    store = LocalStore(tmp_path)
    store.put_bytes("a", b"1")
    (tmp_path / ".b.0123abcd.framefarm-tmp").write_bytes(b"partial")
    assert store.list() == ["a"]


def test_local_list_hides_folders_being_written(tmp_path):
    store = LocalStore(tmp_path)
    store.put_bytes("frames/000000.png", b"1")
    staging = tmp_path / ".frames.0123abcd.framefarm-tmp"  # a PNG output before its rename
    staging.mkdir()
    (staging / "000000.png").write_bytes(b"partial")
    assert store.list() == ["frames/000000.png"]


def test_s3_forbidden_read_of_a_missing_key_is_file_not_found(bucket):
    # Under the project's least-privilege policy S3 answers GET/HEAD of a missing key with
    # 403 (moto does not enforce IAM, so the 403 is the input here); the store must still
    # say "not found" when a listing shows the key is absent, and pass a 403 on otherwise.
    from botocore.exceptions import ClientError

    store = _s3_store(bucket)
    forbidden = ClientError({"Error": {"Code": "403", "Message": "Forbidden"}}, "HeadObject")
    assert isinstance(store._missing_or("nope.bin", forbidden), FileNotFoundError)
    store.put_bytes("there.bin", b"x")
    assert store._missing_or("there.bin", forbidden) is forbidden


def test_local_path_and_uri(tmp_path):
    store = LocalStore(tmp_path / "s")
    assert store.uri == str(tmp_path / "s")
    store.put_bytes("x/y", b"1")
    assert store.local_path("x/y") == str(tmp_path / "s" / "x" / "y")
    assert Path(store.local_path("x/y")).read_bytes() == b"1"
    assert not (tmp_path / "never").exists()
    LocalStore(tmp_path / "never").list()  # reading creates nothing
    assert not (tmp_path / "never").exists()


def test_local_files_get_default_permissions(tmp_path):
    store = LocalStore(tmp_path)
    store.put_bytes("a", b"1")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o666 & ~umask


# ---------------------------------------------------------------------------------------
# S3 specifics


def test_s3_local_path_is_none_and_repr_has_no_secrets(bucket):
    store = S3Store(bucket, "p/q")
    assert store.local_path("k") is None
    assert repr(store) == f"S3Store(bucket={bucket!r}, prefix='p/q')"
    assert "testing" not in repr(store)
    assert store.uri == f"s3://{bucket}/p/q"
    assert S3Store(bucket).uri == f"s3://{bucket}"


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"])
def test_endpoint_from_environment(bucket, monkeypatch, aws_env, variable):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv(variable, aws_env)
    store = open_store(f"s3://{bucket}/p")
    assert isinstance(store, S3Store)
    store.put_bytes("k", b"via env")
    assert store.get_bytes("k") == b"via env"
    assert read_uri_bytes(f"s3://{bucket}/p/k") == b"via env"


def test_explicit_endpoint_beats_environment(bucket, monkeypatch, aws_env):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1")  # nothing listens
    store = S3Store(bucket, "p", endpoint_url=aws_env)
    store.put_bytes("k", b"explicit")
    assert store.get_bytes("k") == b"explicit"


def test_s3_missing_bucket_is_file_not_found(aws_env):
    with pytest.raises(FileNotFoundError):
        S3Store("no-such-bucket-framefarm").get_bytes("k")


def test_s3_list_skips_folder_markers(bucket, admin_client):
    store = _s3_store(bucket)
    admin_client.put_object(Bucket=bucket, Key=f"{store.prefix}/dir/", Body=b"")
    store.put_bytes("dir/file", b"1")
    assert store.list() == ["dir/file"]


# ---------------------------------------------------------------------------------------
# URIs


def test_open_store_routing(tmp_path, monkeypatch, aws_env):
    monkeypatch.chdir(tmp_path)
    rel = open_store("rel/dir")
    assert isinstance(rel, LocalStore) and rel.uri == str(tmp_path / "rel" / "dir")
    assert open_store(str(tmp_path)) == LocalStore(tmp_path)
    assert open_store(tmp_path) == LocalStore(tmp_path)
    assert open_store(f"file://{tmp_path}") == LocalStore(tmp_path)
    assert open_store("file:///a%20b/c") == LocalStore("/a b/c")
    s3 = open_store("s3://bkt/some/prefix/")
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.prefix, s3.uri) == ("bkt", "some/prefix", "s3://bkt/some/prefix")
    assert open_store("s3://bkt").uri == "s3://bkt"


@pytest.mark.parametrize(
    "uri",
    ["gs://bucket/x", "http://host/x", "https://host/x", "s3:/bkt/x", "s3:///x",
     "file://otherhost/x", "hdfs://n/x", ""],
)
def test_open_store_rejects_other_schemes(uri):
    with pytest.raises(ValueError):
        open_store(uri)


def test_split_uri_and_is_s3(tmp_path):
    assert split_uri("s3://b/k/e/y") == ("s3", "b", "k/e/y")
    assert split_uri("S3://b/") == ("s3", "b", "")
    assert split_uri("/x/y") == ("file", "", "/x/y")
    assert split_uri("file:///x/y") == ("file", "", "/x/y")
    assert is_s3("s3://b/k") and is_s3("S3://b")
    assert not is_s3("/s3/b") and not is_s3("gs://b") and not is_s3(tmp_path)


def test_read_uri_rejects_bucket_only(aws_env):
    with pytest.raises(ValueError):
        read_uri_bytes("s3://bkt")


def test_import_does_not_touch_boto3():
    # Also with boto3 unimportable: local storage must still work there, and s3://
    # must say what is missing.
    code = """
import sys
import infra.storage as st
assert "boto3" not in sys.modules and "botocore" not in sys.modules, "imported boto"
sys.modules["boto3"] = None
sys.modules["botocore"] = None
import tempfile
with tempfile.TemporaryDirectory() as d:
    s = st.open_store(d)
    s.put_bytes("k", b"v")
    assert s.get_bytes("k") == b"v"
try:
    st.open_store("s3://bucket/p")
except ImportError as e:
    assert "boto3" in str(e)
else:
    raise AssertionError("expected ImportError")
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_local_delete_drops_folders_it_empties(tmp_path):
    from infra.storage import LocalStore

    store = LocalStore(tmp_path / "root")
    store.put_bytes("segments/job/a.mp4", b"a")
    store.put_bytes("segments/job/b.mp4", b"b")
    store.put_bytes("video.mp4", b"v")
    store.delete("segments/job/a.mp4")
    assert (tmp_path / "root" / "segments" / "job").is_dir()
    store.delete("segments/job/b.mp4")
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["video.mp4"]

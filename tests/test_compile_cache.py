"""The compile cache: keys, locations, and a real compile paid once across two fresh processes."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch

from actors.compile_cache import (
    CompileCache,
    cache_facts,
    compile_cache_key,
    compiles,
    decoder_facts,
    default_cache_uri,
    resolve_cache_uri,
    runtime_facts,
    user_cache_dir,
)

RUNTIME = {"torch": "2.13.0", "cuda": "12.8", "triton": "3.5.0", "python": "3.12.3",
           "device": {"name": "NVIDIA H200", "arch": "sm_90", "cudnn": 91000}}
DECODER = {"class": "actors.wan.WanDecoder", "name": "wan2.1-vae", "config": {"z_dim": 16},
           "options": {"compile": True, "cuda_graphs": True}, "code": "abc"}


def _key(runtime=RUNTIME, decoder=DECODER, h=90, w=160, dtype="bf16"):
    return compile_cache_key(cache_facts(runtime, decoder, h, w, dtype))


def test_key_is_stable_readable_and_changes_with_every_fact():
    key = _key()
    assert key == _key() and key.startswith("wan2.1-vae-160x90-bf16-sm_90-") and key.endswith(".tar.gz")
    variants = [
        _key(runtime={**RUNTIME, "torch": "2.14.0"}),
        _key(runtime={**RUNTIME, "triton": "3.6.0"}),
        _key(runtime={**RUNTIME, "device": {**RUNTIME["device"], "name": "NVIDIA H100 80GB HBM3"}}),
        _key(runtime={**RUNTIME, "device": {**RUNTIME["device"], "arch": "sm_120"}}),
        _key(h=88), _key(w=176), _key(dtype="fp32"),
        _key(decoder={**DECODER, "options": {"compile": True, "cuda_graphs": False}}),
        _key(decoder={**DECODER, "config": {"z_dim": 48}}),
        _key(decoder={**DECODER, "code": "abd"}),
    ]
    assert len({key, *variants}) == len(variants) + 1


def test_default_location_follows_the_jobs_store():
    # Under the output's first prefix component: what the workers' IAM policy grants.
    assert default_cache_uri("s3://bucket/team/renders/a", "/c") == "s3://bucket/team/framefarm-cache/compile"
    assert default_cache_uri("s3://bucket/", "/c") == "s3://bucket/framefarm-cache/compile"
    assert default_cache_uri("/data/out", "/home/u/.cache") == "/home/u/.cache/framefarm/compile"
    assert resolve_cache_uri(None, "s3://b/x/y", "/c") == "s3://b/x/framefarm-cache/compile"
    assert resolve_cache_uri("s3://other/cc", "s3://b/x", "/c") == "s3://other/cc"
    assert resolve_cache_uri("off", "s3://b/x", "/c") is None
    with pytest.raises(ValueError):
        resolve_cache_uri("gs://b/cc", "s3://b/x", "/c")
    assert user_cache_dir({"XDG_CACHE_HOME": "/x"}) == "/x"
    assert user_cache_dir({}).endswith(".cache")


@dataclasses.dataclass(frozen=True)
class _Options:
    compile: bool = False
    cuda_graphs: bool = False


class _Decoder:
    """What decoder_facts reads of a decoder: name, config, a dataclass of options, its module."""

    name = "wan2.1-vae"

    def __init__(self, options):
        self.options, self.config = options, {"z_dim": 16}


def test_facts_of_this_process_and_of_a_decoder():
    runtime = runtime_facts(torch.device("cpu"))
    assert runtime["torch"] == torch.__version__ and runtime["device"]["arch"].startswith("cpu-")
    a, b = decoder_facts(_Decoder(_Options(compile=True))), decoder_facts(_Decoder(_Options()))
    assert a["options"] == {"compile": True, "cuda_graphs": False} and not b["options"]["compile"]
    assert a["code"] == b["code"] and len(a["code"]) == 16  # this test module's source
    assert a["class"].endswith("_Decoder") and a["config"] == {"z_dim": 16}
    assert compiles(_Decoder(_Options(compile=True))) and not compiles(_Decoder(_Options())) and not compiles(object())
    json.dumps(cache_facts(runtime, a, 8, 8, "fp32"))  # JSON-able as a whole


def test_an_object_cannot_write_outside_its_folder(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("../escaped")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    store = tmp_path / "store"
    store.mkdir()
    (store / "k.tar.gz").write_bytes(buf.getvalue())
    with pytest.raises(tarfile.TarError):
        CompileCache(str(store), "k.tar.gz", str(tmp_path / "local")).load()
    assert not (tmp_path / "escaped").exists()


def _child(store, key, local):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    done = subprocess.run([sys.executable, "-m", "tests.compile_cache_child", store, key, local], env=env,
                          capture_output=True, text=True, timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_second_process_elsewhere_compiles_nothing(tmp_path):
    store, key = str(tmp_path / "store"), "norm_act-cpu.tar.gz"
    first = _child(store, key, str(tmp_path / "node-a"))
    assert not first["found"] and first["misses"] >= 1 and first["saved"] > 0
    assert os.path.isfile(os.path.join(store, key))
    # Another process, with its own (empty) inductor folder at another path: as a new node would.
    second = _child(store, key, str(tmp_path / "node-b"))
    assert second["found"] and second["misses"] == 0 and second["hits"] >= 1 and second["saved"] == 0
    assert second["out"] == first["out"]


_KEY_OF_A_WAN_DECODER = """
import torch
from actors import compile_cache as cc
from actors.wan import random_wan_decoder, tiny_wan_config
d = random_wan_decoder(tiny_wan_config(), seed=1)
print(cc.compile_cache_key(cc.cache_facts(cc.runtime_facts(torch.device("cpu")), cc.decoder_facts(d), 8, 8, "fp32")))
"""


def test_every_process_names_a_wan_decoder_s_compiled_code_alike():
    # Seen on an H200: diffusers' config carries a list in set order, so two workers (two
    # hash seeds) keyed the same decoder differently and never found each other's cache.
    keys = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", _KEY_OF_A_WAN_DECODER], env=env, capture_output=True,
                             text=True, timeout=300, check=True)
        keys.add(out.stdout.strip().splitlines()[-1])
    assert len(keys) == 1, keys

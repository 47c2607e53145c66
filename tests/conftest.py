"""Shared fixtures: an isolated multi-node Ray cluster on this machine, a tiny Wan VAE folder."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch


def block_segments(out) -> None:
    """A file where the job's segments folder must go under `out` (a Path): every segment
    write fails with an OSError, as a full or vanished disk would."""
    out.mkdir()
    (out / "segments").write_bytes(b"in the way")


def clear_segments_on_retry(out, retries: list):
    """A job's on_event that removes `block_segments`' obstacle at the first retry, noting in
    `retries` the index of every shard retried."""
    def on_event(kind, info):
        if kind == "retry":
            retries.append(info["shard"].index)
            if (out / "segments").is_file():
                (out / "segments").unlink()
    return on_event


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def _private_ray_tmpdir():
    """Every Ray this test run starts lives under its own temp dir: nothing joins another's Ray."""
    with pytest.MonkeyPatch.context() as env:
        # Short: Ray puts Unix sockets under it (107 bytes at most for a socket path).
        env.setenv("RAY_TMPDIR", tempfile.mkdtemp(prefix="ff", dir="/tmp"))
        yield


@pytest.fixture(scope="session", autouse=True)
def _ray_workers_at_normal_priority():
    """Ray starts its workers at nice 15 so that a busy node's raylet stays responsive. Beside
    anything CPU-bound at nice 0 (two busy loops on 2 cores), that weight (36 against 1024) left
    the actors under test about 3% of a core: a 2 s render took 90 s and the suite 85 minutes.
    The suite's Ray clusters are its own, so their workers run at the priority of the test run
    that started them; every raylet started here (and every child process) inherits this."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_worker_niceness", "0")
        yield


@pytest.fixture(scope="module")
def ray_cluster():
    """A head and two worker nodes, each with one fake GPU: three decode workers on three nodes.

    Torch sees no CUDA, so the GPU-holding workers decode on the CPU (the CPU path).
    """
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 2, "num_gpus": 1, "include_dashboard": False,
                                      "object_store_memory": 200 * 2**20})
    nodes = [cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=200 * 2**20) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        yield cluster, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="session")
def tiny_wan_dir(tmp_path_factory):
    """A tiny random AutoencoderKLWan saved in diffusers format (config.json + safetensors)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan

    from actors.wan import tiny_wan_config

    path = tmp_path_factory.mktemp("tiny-wan")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        vae = AutoencoderKLWan.from_config(tiny_wan_config())
    vae.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def tiny_latents(latent_frames: int, seed: int = 0, h: int = 8, w: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, latent_frames, h, w, generator=g)

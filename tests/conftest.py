"""Shared fixtures: an isolated multi-node Ray cluster on this machine, a tiny Wan VAE folder."""

from __future__ import annotations

import os
import socket
import tempfile
import time

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


def wait_for(condition, timeout_s: float = 120.0, what: str = "", interval_s: float = 0.02) -> None:
    """Poll `condition` until it holds, failing the test after `timeout_s`: a wait on the state
    itself (a file, a process, a key in the GCS) while something else makes progress on its own,
    never a guess at how long that takes."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval_s)


def start_job_head(**head_node_args):
    """A `ray.cluster_utils.Cluster` head with its dashboard on free loopback ports, returned
    with the dashboard's URL once that head can take a `ray job submit`.

    Two waits Ray leaves to its callers on a loaded machine. The GCS server gets 30 s to write
    its port file; that once ran out on a loaded 2-core CI machine, so there is one more start
    on new ports (a head that did not come up is not one to keep). And a job is handed to the
    head node's dashboard agent, which the job server gives 10 s to appear in the GCS
    ("No available agent to submit job", a CI run of 2026-12-02): the head is returned only
    once its agent's address is there, the key the job server reads."""
    from ray._raylet import GcsClient
    from ray._private.ray_constants import KV_NAMESPACE_DASHBOARD
    from ray.cluster_utils import Cluster
    from ray.dashboard.consts import DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX

    for tries_left in (1, 0):
        port = free_port()
        try:
            cluster = Cluster(initialize_head=True, connect=False, head_node_args={
                "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port,
                "dashboard_agent_listen_port": free_port(), **head_node_args})
            break
        except RuntimeError as exc:
            if not tries_left or "Timed out waiting for file" not in str(exc):
                raise
    cluster.wait_for_nodes()
    gcs = GcsClient(address=cluster.address)
    key = f"{DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX}{cluster.head_node.node_id}".encode()
    try:
        wait_for(lambda: gcs.internal_kv_get(key, namespace=KV_NAMESPACE_DASHBOARD, timeout=30), timeout_s=180,
                 what="the head's dashboard agent to register", interval_s=0.2)
    except AssertionError:
        cluster.shutdown()
        raise
    return cluster, f"http://127.0.0.1:{port}"


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

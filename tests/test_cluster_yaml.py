"""ray_cluster.yaml: Ray's own offline validation, then framefarm's rules for the file.

Nothing here talks to AWS: Ray's prepare_config/validate_config read only the file, the
AWS defaults and the schema shipped in the wheel (test_validation_is_offline holds them to
it), and every resource is written out so that nothing needs DescribeInstanceTypes.
"""

from __future__ import annotations

import copy
import functools
import re
import shlex
import socket
import tomllib
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.aws.config import DEFAULT_AMI
from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for
from ray.autoscaler._private.util import prepare_config, validate_config

from infra import spot_watcher

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "ray_cluster.yaml"
GiB = 2**30

# shared/DESIGN.md, "AWS G7e": GPUs, vCPUs, GiB of memory.
G7E = {
    "g7e.2xlarge": (1, 8, 64),
    "g7e.12xlarge": (2, 48, 512),
    "g7e.24xlarge": (4, 96, 1024),
    "g7e.48xlarge": (8, 192, 2048),
}
SCRATCH = "/opt/dlami/nvme"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared(config) -> dict:
    return prepare_config(copy.deepcopy(config))


def gpu_types(config) -> dict:
    return {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


def all_commands(config) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    return [cmd for key in keys for cmd in config.get(key, [])]


def test_passes_rays_offline_validation(prepared):
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"


def test_validation_is_offline(config, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("prepare_config/validate_config tried to open a connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    validate_config(prepare_config(copy.deepcopy(config)))


def test_head_takes_no_gpu_work(config):
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["GPU"] == 0
    assert head["resources"]["CPU"] > 0
    assert head["max_workers"] == 0
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))


def test_every_g7e_size_has_an_on_demand_and_a_spot_type(config):
    seen: dict[str, set[str]] = {}
    for name, t in gpu_types(config).items():
        market = t["node_config"].get("InstanceMarketOptions", {}).get("MarketType", "on-demand")
        seen.setdefault(t["node_config"]["InstanceType"], set()).add(market)
        assert t["labels"]["market"] == market, name
    assert seen == {size: {"on-demand", "spot"} for size in G7E}
    for name, t in gpu_types(config).items():
        spot = t["node_config"].get("InstanceMarketOptions")
        if spot:
            assert spot["SpotOptions"]["InstanceInterruptionBehavior"] == "terminate", name
            assert "MaxPrice" not in spot["SpotOptions"], name  # capped at on-demand, never outbid


def test_gpu_node_resources_match_the_g7e_table(config):
    for name, t in gpu_types(config).items():
        size = t["node_config"]["InstanceType"]
        gpus, vcpus, gib = G7E[size]
        custom = size.replace(".", "_")
        assert t["resources"] == {"CPU": vcpus, "GPU": gpus, "memory": gib * GiB, custom: 1}, name
        assert all(type(v) is int for v in t["resources"].values()), name  # Ray's schema wants integers


def test_gpu_nodes_scale_from_zero(config):
    assert 0 < config["idle_timeout_minutes"] <= 15
    for name, t in gpu_types(config).items():
        assert t["min_workers"] == 0, name
        assert t["max_workers"] >= 1, name
    assert config["max_workers"] >= max(t["max_workers"] for t in gpu_types(config).values())
    assert config["provider"]["cache_stopped_nodes"] is False  # idle nodes end, not stop


def test_ami_is_a_current_deep_learning_base_ami_never_rays_default(config):
    images = {t["node_config"]["ImageId"] for t in config["available_node_types"].values()}
    assert len(images) == 1, "one image everywhere, so every node has the same Python for Ray"
    (image,) = images
    assert image not in set(DEFAULT_AMI.values()) and image.lower() not in ("", "latest_dlami")
    assert re.fullmatch(r"ami-[0-9a-f]{8,17}", image) or re.fullmatch(
        r"resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-2[24]\.04/\S+", image
    ), image


def test_ray_pin_in_setup_matches_pyproject(config):
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in deps if d.replace(" ", "").startswith("ray[default,serve]==")]
    version = pin.split("==")[1].strip()
    pins = re.findall(r"ray\[default,serve\]==([0-9][^\s\"']*)", " ".join(all_commands(config)))
    assert pins == [version]
    assert any(f"ray.__version__ == '{version}'" in c for c in config["setup_commands"])
    # framefarm itself: the wheel built from this checkout, mounted on every node.
    (mount,) = [m for m in config["file_mounts"] if m.endswith("framefarm-dist")]
    assert any(f"{mount}/framefarm-" in c for c in config["setup_commands"])


def test_every_node_runs_with_token_auth_and_the_shared_token(config):
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), start


def test_nodes_use_their_own_iam_profiles_and_imdsv2(config):
    head = config["available_node_types"][config["head_node_type"]]["node_config"]
    assert head["IamInstanceProfile"] == {"Name": "framefarm-head"}  # else Ray makes a FullAccess role
    for name, t in config["available_node_types"].items():
        nc = t["node_config"]
        if name != config["head_node_type"]:
            assert nc["IamInstanceProfile"] == {"Name": "framefarm-worker"}, name
        assert nc["MetadataOptions"]["HttpTokens"] == "required", name


def test_dashboard_is_not_exposed(config):
    sg = config["provider"]["security_group"]
    for rule in sg.get("IpPermissions", []):
        assert not (rule.get("FromPort", 0) <= 8265 <= rule.get("ToPort", -1)), rule
    (start,) = [c for c in config["head_start_ray_commands"] if "ray start --head" in c]
    assert "--dashboard-host=127.0.0.1" in start
    assert "0.0.0.0" not in " ".join(all_commands(config))


def test_worker_scratch_is_the_local_nvme(config):
    setup = " ".join(config["worker_setup_commands"])
    assert "mountpoint -q $SCRATCH" in setup and f"SCRATCH={SCRATCH}" in setup
    assert "Instance Storage" in setup  # the instance-store devices, never the EBS root
    (start,) = [c for c in config["worker_start_ray_commands"] if "ray start" in c]
    assert f"--temp-dir={SCRATCH}/ray" in start
    assert f"TMPDIR={SCRATCH}/tmp" in start  # framefarm's scratch dirs come from tempfile


def test_workers_start_the_spot_watcher_with_arguments_it_accepts(config):
    (cmd,) = [c for c in config["worker_start_ray_commands"] if "infra.spot_watcher" in c]
    argv = shlex.split(cmd.split("-m infra.spot_watcher", 1)[1])
    args = spot_watcher.parser().parse_args(argv)
    assert args.address == "$RAY_HEAD_IP:6379"
    assert args.node_id is None  # found on the node when a notice comes
    assert 0 < args.interval <= 5
    assert not any("infra.spot_watcher" in c for c in config["head_start_ray_commands"])


def test_autoscaler_packs_gpu_demand_and_prefers_on_demand_over_spot(prepared):
    """What Ray 2.60's autoscaler (v1) launches for N single-GPU decode workers."""
    types = prepared["available_node_types"]
    scorer = functools.partial(_default_utilization_scorer,
                               node_availability_summary=NodeAvailabilitySummary({}))

    def launch(n: int, existing: dict | None = None) -> dict:
        to_add, residual = get_nodes_for(types, existing or {}, prepared["head_node_type"], 100,
                                         [{"GPU": 1, "CPU": 1}] * n, scorer)
        assert residual == []
        return dict(to_add)

    assert launch(1) == {"worker.g7e.2xlarge": 1}
    assert launch(2) == {"worker.g7e.12xlarge": 1}
    assert launch(4) == {"worker.g7e.24xlarge": 1}
    assert launch(8) == {"worker.g7e.48xlarge": 1}
    # Once the on-demand type is at its max_workers, the spot type of the same size.
    full = {"worker.g7e.2xlarge": types["worker.g7e.2xlarge"]["max_workers"]}
    assert launch(1, full) == {"spot.g7e.2xlarge": 1}

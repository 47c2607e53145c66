"""The warm farm: decode replicas that outlive jobs, shared by every job on the cluster.

    python -m jobs.farm up [--device cuda --capacity N] [--idle-s 300]   # deploy (or update) it
    python -m jobs.farm status                                            # replicas, running jobs
    python -m jobs.farm down                                              # stop it

Every command joins the running cluster (RAY_ADDRESS, --address, or the one on this host);
the farm lives there, not in this process. Jobs find it by name: `python -m jobs.render`
uses it whenever it runs (--farm on also starts it).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import ray

from actors.service import FarmConfig
from cluster.dispatch import NoWorkersError, resolve_workers
from cluster.service import deploy, farm_status, undeploy


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.farm", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["up", "status", "down"])
    p.add_argument("--address", default="auto",
                   help="Ray cluster to join (default: RAY_ADDRESS or the cluster running on this host)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="up: replicas hold a GPU each (cuda), a CPU (cpu), or GPUs if the cluster has any")
    p.add_argument("--capacity", type=int,
                   help="up: most replicas (default: the cluster's GPUs; required with --device cuda on a "
                        "cluster whose GPU nodes the autoscaler has not started yet)")
    p.add_argument("--min-replicas", type=int, default=0, help="up: replicas kept while idle (default 0: none)")
    p.add_argument("--idle-s", type=float, default=300.0,
                   help="up: seconds a replica may idle before it is let go (and its GPU node with it)")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> FarmConfig:
    use_gpu, capacity = resolve_workers(args.device, args.capacity)
    if args.min_replicas > capacity:
        raise ValueError(f"--min-replicas {args.min_replicas} is more than the capacity {capacity}")
    return FarmConfig(capacity=capacity, use_gpu=use_gpu, min_replicas=args.min_replicas, idle_s=args.idle_s)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        ray.init(address=args.address, logging_level=logging.WARNING)
    except ConnectionError as exc:
        print(f"framefarm: no Ray cluster to join ({exc}); start one first, e.g. `ray start --head` "
              "(docs/deploy.md, 'The warm farm')", file=sys.stderr)
        return 2
    try:
        if args.command == "up":
            try:
                config = config_from_args(args)
            except (NoWorkersError, ValueError) as exc:
                print(f"framefarm: {exc}", file=sys.stderr)
                return 2
            deploy(config)
            print(json.dumps(farm_status(), indent=2))
        elif args.command == "status":
            print(json.dumps(farm_status(), indent=2))
        else:
            print("framefarm: farm stopped" if undeploy() else "framefarm: no farm was running")
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

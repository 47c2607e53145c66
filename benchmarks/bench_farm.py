"""Two jobs in a row through `python -m jobs.render` against the warm farm (issue 11).

    python -m benchmarks.bench_farm [--latent-frames 81] [--size 1280x720] [--decoder wan2.1]
                                    [--dtype bf16] [--device cuda] [--out bench_farm.json]

Starts a private Ray head on free ports (ray.cluster_utils, stopped by its own handle), with
every GPU of the machine, deploys the farm (one replica per GPU, none at rest), writes
random latents of --latent-frames at --size, and runs the same `python -m jobs.render ...
--random-weights --farm auto` twice as separate driver processes. The first job starts a
replica (cold: process, imports, weights, first steps); the second finds it warm. Prints,
per job: wall time, time to first frame, GPU utilization over the job's whole time (busy /
wall x replicas used; issue 11's target for the second job: >= 90%), and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

import ray
import torch
from safetensors.torch import save_file

from actors.service import FarmConfig
from cluster.service import deploy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_farm", description=__doc__.split("\n\n")[0])
    p.add_argument("--latent-frames", type=int, default=81)
    p.add_argument("--size", default="1280x720", help="pixels, WxH (latents are 8x smaller)")
    p.add_argument("--decoder", default="wan2.1")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="bench_farm.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    gpus = torch.cuda.device_count()
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": os.cpu_count(), "num_gpus": gpus, "include_dashboard": False,
        "dashboard_agent_listen_port": free_port()})
    ray.init(address=cluster.address)
    try:
        deploy(FarmConfig(capacity=max(1, gpus), use_gpu=gpus > 0, idle_s=600))
        work = tempfile.mkdtemp(prefix="bench-farm-")
        latents = os.path.join(work, "latents.safetensors")
        save_file({"latents": torch.randn(16, args.latent_frames, height // 8, width // 8)}, latents)
        results = []
        for run in ("first (cold replica)", "second (warm replica)"):
            out = os.path.join(work, f"out{len(results)}")
            cmd = [sys.executable, "-m", "jobs.render", latents, out, "--decoder", args.decoder, "--random-weights",
                   "--dtype", args.dtype, "--device", args.device, "--farm", "auto"]
            proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "RAY_ADDRESS": cluster.address},
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-4000:], file=sys.stderr)
                return 1
            with open(os.path.join(out, "summary.json")) as f:
                s = json.load(f)
            results.append({"run": run, "wall_s": s["wall_seconds"], "time_to_first_frame_s": s["time_to_first_frame_s"],
                            "gpu_utilization": s["gpu_utilization"], "workers": s["workers"], "farm": s["farm"],
                            "startup": s.get("startup")})
        print(f"{'job':24} {'wall s':>8} {'first frame s':>14} {'GPU util (job)':>15}")
        for r in results:
            print(f"{r['run']:24} {r['wall_s']:8.2f} {r['time_to_first_frame_s']:14.2f} {r['gpu_utilization']:15.1%}")
        device = torch.cuda.get_device_name(0) if gpus else "cpu"
        with open(args.out, "w") as f:
            json.dump({"device": device, "args": vars(args), "jobs": results}, f, indent=2)
        print(f"second job's GPU utilization over its whole job time: {results[1]['gpu_utilization']:.1%} "
              f"on {device} (target >= 90%)")
    finally:
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Jobs in a row through `python -m jobs.render` against the warm farm (issue 11).

    python -m benchmarks.bench_farm [--latent-frames 81] [--size 1280x720] [--decoder wan2.1]
                                    [--dtype bf16] [--device cuda] [--runs 2] [--out bench_farm.json]
                                    [-- EXTRA jobs.render OPTIONS]

Starts a private Ray head on free ports (ray.cluster_utils, stopped by its own handle), with
every GPU of the machine, deploys the farm (one replica per GPU, none at rest), writes the
latents (random ones for a Wan decoder, with --random-weights; the test pattern's own for
`--decoder test-pattern`, whose frames are then checked one by one), and runs the same
`python -m jobs.render ... --farm auto` --runs times as separate driver processes. The first
job starts a replica (cold: process, imports, weights, first steps); the later ones find it
warm.

For each job it prints where the time went, from the driver's process start to its exit:

  driver start     the interpreter and the driver's imports, before the job's first step
  to first frame   the job's start to its first shard's first decode step (the summary's
                   time_to_first_frame_s: read and validate the input, join Ray, find the
                   farm, the first replica's answer, the latents to the replica)
  shards           first decode step to the last shard's segment committed (decode, the
                   encoder's flush, the segment's checksum and commit)
  stitch           the last segment committed to the video committed by the stitcher
  report           the video committed to the end of the job's time (manifest, timeline)
  after            the end of the job's time to the process's exit (summary.json, the
                   publication's renames, deleting segments, leaving Ray)

and GPU utilization three ways: over the job's time as its summary.json defines it
(`gpu_utilization`: busy seconds / (job seconds x replicas used), the job's time running from
its first step after the driver's imports to its render written and ready to publish; issue
11's target for a warm job: >= 90%), and over the driver process's whole life (the same busy
seconds over spawn to exit, the stricter figure). "Busy" is the decode stage's own time,
measured with CUDA events around each step on a GPU. The third, independent of framefarm's
own accounting, is NVML's: `nvidia-smi` sampled every 100 ms (the share of each sample
period in which a kernel ran), averaged over the job's time (`nvml_utilization_job`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime

import ray
import torch
from safetensors.torch import save_file

from actors.decoders import pattern_latents, read_index
from actors.protocol import pixel_frames
from actors.service import FarmConfig
from actors.sinks import read_frames
from cluster.service import deploy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_PATTERN = "test-pattern"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_farm", description=__doc__.split("\n\n")[0])
    p.add_argument("--latent-frames", type=int, default=81)
    p.add_argument("--size", default="1280x720", help="pixels, WxH (latents are 8x smaller)")
    p.add_argument("--decoder", default="wan2.1", help=f"a Wan decoder (random weights) or {TEST_PATTERN}")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--runs", type=int, default=2, help="jobs in a row (the first finds the farm cold)")
    p.add_argument("--workers", type=int, default=None,
                   help="replicas of the farm (default: the machine's GPUs, or 1 without any)")
    p.add_argument("--json", "--out", dest="out", default="bench_farm.json")
    p.add_argument("extra", nargs="*", help="after --: more jobs.render options (--shard-latents 20, ...)")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be >= 1")
    return args


class NvmlSampler:
    """`nvidia-smi` utilization samples, every 100 ms, while it runs; none without a GPU."""

    def __init__(self):
        self.samples: list[tuple[float, int, float]] = []  # (epoch s, GPU index, utilization 0..1)
        self._proc = None
        if shutil.which("nvidia-smi") and torch.cuda.is_available():
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=timestamp,index,utilization.gpu", "--format=csv,noheader,nounits",
                 "-lms", "100"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()

    def _read(self) -> None:
        for line in self._proc.stdout:
            try:
                stamp, index, util = (v.strip() for v in line.split(","))
                when = datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp()  # local time
                self.samples.append((when, int(index), float(util) / 100))
            except ValueError:
                continue

    def mean(self, start: float, end: float) -> float | None:
        """Mean utilization of the GPUs that did any work in [start, end]."""
        inside = [(i, u) for t, i, u in self.samples if start <= t <= end]
        used = {i for i, u in inside if u > 0}
        values = [u for i, u in inside if i in used]
        return sum(values) / len(values) if values else None

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(10)


def _trace(out: str) -> list[dict]:
    with open(os.path.join(out, "timeline.json")) as f:
        return json.load(f)["traceEvents"]


def breakdown(out: str, spawned: float, exited: float, nvml: NvmlSampler | None = None) -> dict:
    """Where one job's time went, from its driver's spawn to its exit (see the module's doc)."""
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    started, wall = s["started_at"], s["wall_seconds"]
    first_frame = started + s["time_to_first_frame_s"]
    trace = _trace(out)
    shards = [e for e in trace if e.get("tid") == 1 and e["name"].startswith("shard ") and e["ph"] == "X"]
    phases = [e for e in trace if e.get("tid") == 2 and e["ph"] == "X"]
    last_shard_end = started + max(e["ts"] + e["dur"] for e in shards) / 1e6
    committed = last_shard_end + s["last_shard_to_video_s"]
    process = exited - spawned
    busy = s["busy_seconds"]

    def phase_s(name: str) -> float:
        return round(sum(e["dur"] for e in phases if e["name"] == name) / 1e6, 3)

    return {
        "process_s": process, "job_s": wall, "busy_s": busy, "replicas": s["workers"], "shards": s["shards"],
        "gpu_utilization": s["gpu_utilization"],
        "gpu_utilization_process": busy / (process * s["workers"]),
        "gpu_utilization_in_shards": s["gpu_utilization_in_shards"],
        "nvml_utilization_job": nvml.mean(started, started + wall) if nvml else None,
        "nvml_utilization_process": nvml.mean(spawned, exited) if nvml else None,
        "time_to_first_frame_s": s["time_to_first_frame_s"],
        "spans_s": {
            "driver start": started - spawned,
            "to first frame": s["time_to_first_frame_s"],
            "shards": last_shard_end - first_frame,
            "stitch": committed - last_shard_end,
            "report": started + wall - committed,
            "after": exited - (started + wall),
        },
        "shard_phases_s": {name: phase_s(name) for name in ("setup", "decode+copy+encode", "encoder flush", "upload")},
        "driver_phases_s": {e["name"]: round(e["dur"] / 1e6, 3) for e in trace if e["pid"] == -1 and e["ph"] == "X"},
        "farm": s["farm"], "startup": s.get("startup"),
        "timeline": trace,  # the job's timeline.json, for what the spans above do not say
    }


def check_pattern(out: str, latent_frames: int) -> None:
    frames = read_frames(os.path.join(out, "video.mp4"), "mp4")
    if [read_index(f) for f in frames] != list(range(pixel_frames(latent_frames))):
        raise SystemExit(f"{out}: the video's frames are not the test pattern's 0..{pixel_frames(latent_frames) - 1}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    gpus = torch.cuda.device_count()
    replicas = args.workers or max(1, gpus)
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": os.cpu_count(), "num_gpus": gpus, "include_dashboard": False,
        "dashboard_agent_listen_port": free_port()})
    ray.init(address=cluster.address)
    work, nvml = None, None
    try:
        deploy(FarmConfig(capacity=replicas, use_gpu=gpus > 0, idle_s=600))
        work = tempfile.mkdtemp(prefix="bench-farm-")  # removed at the end, with the videos
        latents = os.path.join(work, "latents.safetensors")
        if args.decoder == TEST_PATTERN:
            data, weights = pattern_latents(args.latent_frames, height, width), []
        else:
            data, weights = torch.randn(16, args.latent_frames, height // 8, width // 8), ["--random-weights"]
        save_file({"latents": data}, latents)
        results = []
        nvml = NvmlSampler()
        for run in range(args.runs):
            label = "first (cold replica)" if run == 0 else f"{'second' if run == 1 else run + 1} (warm replica)"
            out = os.path.join(work, f"out{run}")
            cmd = [sys.executable, "-m", "jobs.render", latents, out, "--decoder", args.decoder, *weights,
                   "--dtype", args.dtype, "--device", args.device, "--farm", "auto", *args.extra]
            spawned = time.time()
            proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "RAY_ADDRESS": cluster.address},
                                  capture_output=True, text=True)
            exited = time.time()
            if proc.returncode != 0:
                print(proc.stderr[-4000:], file=sys.stderr)
                return 1
            if args.decoder == TEST_PATTERN:
                check_pattern(out, args.latent_frames)
            results.append({"run": label, **breakdown(out, spawned, exited, nvml)})
        spans = list(results[0]["spans_s"])
        print(f"{'job':22} {'process s':>9} {'job s':>6} {'busy s':>6} {'GPU/job':>8} {'GPU/process':>11} "
              f"{'NVML/job':>8}  " + "  ".join(f"{name:>14}" for name in spans))
        for r in results:
            nvml_job = "-" if r["nvml_utilization_job"] is None else f"{r['nvml_utilization_job']:.1%}"
            print(f"{r['run']:22} {r['process_s']:9.2f} {r['job_s']:6.2f} {r['busy_s']:6.2f} "
                  f"{r['gpu_utilization']:8.1%} {r['gpu_utilization_process']:11.1%} {nvml_job:>8}  "
                  + "  ".join(f"{r['spans_s'][name]:14.2f}" for name in spans))
        device = torch.cuda.get_device_name(0) if gpus else "cpu"
        with open(args.out, "w") as f:
            json.dump({"device": device, "cpu_count": os.cpu_count(), "args": vars(args), "jobs": results}, f,
                      indent=2)
        if len(results) > 1:
            print(f"second job's GPU utilization over its job time: {results[1]['gpu_utilization']:.1%} "
                  f"(over its driver process: {results[1]['gpu_utilization_process']:.1%}) on {device} "
                  "(target >= 90%)")
    finally:
        if nvml is not None:
            nvml.stop()
        ray.shutdown()
        cluster.shutdown()
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

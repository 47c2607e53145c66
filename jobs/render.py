"""Render latents to a finished video on the Ray cluster (or an embedded local Ray).

    python -m jobs.render LATENTS OUTPUT [--weights DIR|s3://...] [--random-weights] ...
    python -m jobs.render --demo [OUTPUT]
    ray job submit --working-dir . -- python -m jobs.render s3://b/latents.safetensors s3://b/out ...

Exits non-zero with the reason on stderr when anything fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from actors.protocol import InputError, RenderSpec
from actors.startup import process_started_at
from jobs.cli import add_model_options, describe_errors, model_input

DEMO_OUTPUT = "framefarm-demo"
POSITIONAL = ("latents", "output")
DRIVER_START = "driver start (Python, imports)"


class RunOptions(BaseModel):
    """How this command runs the job, beside the job's own options (RenderSpec)."""

    model_config = ConfigDict(extra="forbid")

    demo: bool = Field(False, description="render synthetic latents with the test-pattern decoder (nothing "
                                          f"is downloaded); OUTPUT defaults to ./{DEMO_OUTPUT}")
    demo_frames: int = Field(41, ge=1, description="latent frames of the demo")
    address: str | None = Field(None, description="Ray cluster to join (host:port, ray://..., or 'auto'); "
                                                  "default: RAY_ADDRESS, else a Ray already running on this "
                                                  "machine, else a new embedded one")
    farm: Literal["auto", "on", "off"] = Field(
        "auto", description="send shards to the cluster's warm farm (python -m jobs.farm): auto uses it when it "
                            "runs, on also starts it (sized by --device/--workers), off starts this job's own workers")
    startup_timeout: float = Field(600.0, gt=0, description="seconds to wait for a first decode worker "
                                                            "(--device cuda on a cluster without GPUs waits "
                                                            "this long for the autoscaler)")


class Command:
    """The parser, and how its arguments become a RenderSpec and RunOptions."""

    def __init__(self):
        self.parser = argparse.ArgumentParser(
            prog="python -m jobs.render", description=__doc__.split("\n\n")[0],
            epilog="Every job option is a field of actors.protocol.RenderSpec (the notebook API's keywords).")
        self.spec_options = add_model_options(self.parser, RenderSpec, positional=POSITIONAL)
        self.run_options = add_model_options(self.parser, RunOptions, title="running")

    def parse(self, argv: list[str] | None = None) -> tuple[dict, RunOptions]:
        """(the spec's input, run options); exits 2 with a usage line on bad arguments."""
        ns = self.parser.parse_args(argv)
        try:
            run = RunOptions(**model_input(self.run_options, ns))
        except ValidationError as exc:
            self.parser.error(describe_errors(exc, self.run_options))
        values = model_input(self.spec_options, ns)
        decoder = values.setdefault("decoder", {})
        if run.demo:
            if "output" not in values:
                values["output"] = values.pop("latents", DEMO_OUTPUT)
            decoder.setdefault("name", "test-pattern")
        elif not (values.get("latents") and values.get("output")):
            self.parser.error("LATENTS and OUTPUT are required (or --demo)")
        return values, run

    def spec(self, values: dict) -> RenderSpec:
        return RenderSpec(**values)


def demo_latents(latent_frames: int):
    from actors.decoders import pattern_latents

    return pattern_latents(latent_frames, height=240, width=320)


def _interrupt_once(signum, frame):
    """Ctrl-C: the first one ends the job; later ones are ignored, so that stopping the workers
    and removing their partial files runs to its end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _kept(job, where: str) -> str:
    if not job.segments_committed:
        return "no segments were committed; nothing to resume"
    return (f"{job.segments_committed} of {job.segments_total} segments are kept in {where}/segments/"
            f"{job.job_id}/; the same command resumes from them")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = Command()
    values, run = command.parse(argv)
    try:
        spec = command.spec(values)
    except ValidationError as exc:
        print(f"framefarm: bad options:\n{describe_errors(exc, command.spec_options)}", file=sys.stderr)
        return 2
    from cluster.api import connect
    from cluster.driver import RenderJob
    from cluster.service import use_farm

    latents = demo_latents(run.demo_frames) if run.demo else None
    job = RenderJob(spec, latents, progress=True, startup_timeout_s=run.startup_timeout)
    where = (os.path.abspath(spec.output) if "://" not in spec.output else spec.output).rstrip("/")
    previous = signal.signal(signal.SIGINT, _interrupt_once)
    spawned = process_started_at()
    if spawned is not None:
        # Before the job's own first step: on its timeline, not in its time (cluster.report).
        job.record_phase(DRIVER_START, spawned)
    # Joining a running cluster (`--address`, RAY_ADDRESS as under `ray job submit`) starts
    # nothing, so it and the farm lookup run while the input is read: 0.15 s of a warm 8 s
    # job on an H200. Without one, bad input must fail before an embedded Ray starts.
    joining = bool(run.address or os.environ.get("RAY_ADDRESS"))
    reading = ThreadPoolExecutor(1, thread_name_prefix="framefarm-prepare") if joining else None
    try:
        prepared = reading.submit(job.prepare) if reading else None
        if prepared is None:
            job.prepare()  # bad input fails here, before Ray is started
        started = False
        try:
            t = time.time()
            started = connect(run.address)
            job.record_phase("join Ray", t)
            t = time.time()
            # Joined, not embedded, under `ray job submit` too (connect() says only that it called ray.init).
            job.use_farm = use_farm(run.farm, spec.device, spec.workers, embedded=started and not joining)
            job.record_phase("look for the farm" + (" (start it)" if run.farm == "on" else ""), t)
            if prepared is not None:
                prepared.result()  # bad input fails here, before any work is sent
            result = job.run()
        finally:
            if prepared is not None:
                wait([prepared])  # never tear down with the input still being read or the lease taken
            if started:
                import ray

                ray.shutdown()
    except KeyboardInterrupt:
        print(f"framefarm: interrupted; {_kept(job, where)}", file=sys.stderr)
        return 130
    except (InputError, ValueError, FileNotFoundError) as exc:
        print(f"framefarm: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a job's failure is reported, not dumped
        logging.getLogger("framefarm").debug("job failed", exc_info=True)
        print(f"framefarm: job failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, previous)
        if reading is not None:
            reading.shutdown(wait=True)
    s = result.summary
    if result.already_rendered:
        print(f"framefarm: already rendered: {spec.output} holds this job's video ({s['frames']} frames); "
              "nothing to do")
        return 0
    print(json.dumps({k: s[k] for k in ("frames", "video_seconds", "wall_seconds", "realtime_factor",
                                        "gpu_utilization", "estimated_cost_usd", "shards", "farm",
                                        "time_to_first_frame_s") if k in s}, indent=2))
    print(f"framefarm: wrote {where}/{s['video']} ({s['frames']} frames, "
          f"{s['video_seconds']:.1f} s at {spec.fps} fps) with manifest.parquet, summary.json, timeline.json")
    return 0


def leave_process(code: int) -> None:
    """End the command's process with `code` as soon as its job is done and told.

    Everything the job needs is finished by then (files committed and published, the farm
    left, Ray shut down, log and output flushed here); what the interpreter's own teardown
    would add is its finalizers and libraries' exit hooks, 1.5-2.8 s of a warm farm job's
    exit measured on a loaded 2-core host (docs/benchmarks.md). Only for the process
    `python -m jobs.render` starts: a caller of `main()` keeps its interpreter."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    leave_process(main())

"""``edge-agent bench``: the agent's own pipeline on a video file, as fast as it goes.

Runs exactly the code the service runs (CameraPipeline, Publisher into a real SQLite spool in a
temporary folder; no broker: paho sends from its own thread, off this path) and reports:

* end-to-end frames/s (decode through publish, single processing thread, as the service);
* per-stage p50/p95 ms: decode, detect (on detection frames only), track, align (+ quality gate),
  encode, head and publish (per batch);
* frame-to-publish latency: from decoding the newest frame of an observation's window to its batch
  being in the spool, i.e. the delay added beyond the window itself;
* CPU % (process CPU time / wall time; 200 % = both cores of a 2-core PC), RSS now and peak;
* how often a face was found: share of frames with at least one visible track, mean faces per frame.

Batches are cut every ``output.interval_s`` of *video* time, as the service would at real speed.
Pin it to the cores the agent will get, e.g. ``taskset -c 0,1 edge-agent bench --video clip.mp4``.
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import tempfile
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from edge_agent.capture import read_file
from edge_agent.config import AgentConfig
from edge_agent.pipeline import STAGES, CameraPipeline, StageClock
from edge_agent.publisher import Publisher
from edge_agent.quality import QualityGate
from edge_agent.service import load_models
from edge_agent.spool import Spool


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _ms(samples: list[float]) -> dict:
    if not samples:
        return {"n": 0}
    values = np.asarray(samples) * 1000
    return {"n": len(values), "p50": round(float(np.percentile(values, 50)), 3),
            "p95": round(float(np.percentile(values, 95)), 3), "mean": round(float(values.mean()), 3)}


def video_fps(path: Path) -> float:
    capture = cv2.VideoCapture(str(path))
    fps = capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    return fps if 0 < fps < 1000 else 25.0


def bench(video: Path, config: AgentConfig, max_frames: int | None = None) -> dict:
    model, detector = load_models(config)
    clock = StageClock()
    pipeline = CameraPipeline("bench", detector, model, QualityGate(config.quality), config.detection,
                              itertools.count(1), clock)
    per_batch = max(1, round(config.output.interval_s * video_fps(video)))
    frames = with_face = faces = 0
    latencies: list[float] = []
    rejected: Counter[str] = Counter()
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp:
        spool = Spool(Path(tmp) / "spool.sqlite3", config.spool.max_batches)
        # encodes and spools only, never connects: no TLS files needed (they may be the service user's)
        publisher = Publisher(config.mqtt.model_copy(update={"tls": None}), config.agent, spool, model.version)
        decoded = read_file(str(video))
        wall, cpu = time.perf_counter(), time.process_time()
        while max_frames is None or frames < max_frames:
            with clock("decode"):
                image = next(decoded, None)
            if image is None:
                break
            pipeline.process(image, time.monotonic())
            frames += 1
            visible = len(pipeline.tracker.visible())
            with_face += visible > 0
            faces += visible
            if frames % per_batch == 0:
                observations, summary = pipeline.collect(time.time())
                rejected.update(summary.rejected)
                with clock("publish"):
                    publisher.publish_batch(observations, [summary])
                done = time.time()
                latencies.extend(done - o.window_end.ToNanoseconds() / 1e9 for o in observations)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        batches = spool.depth
        spool.close()
    if not frames:
        raise ValueError(f"{video} has no frames OpenCV can decode")
    return {
        "video": str(video), "frames": frames, "seconds": round(wall, 3),
        "fps": round(frames / wall, 2),
        "cores": len(os.sched_getaffinity(0)), "cpu_percent": round(100 * cpu / wall, 1),
        "rss_mb": round(_rss_mb(), 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "backend": model.backend, "model_version": model.version,
        "detect_every": config.detection.every,
        "frames_with_face_pct": round(100 * with_face / frames, 2),
        "faces_per_frame": round(faces / frames, 2),
        "batches": batches,
        "rejected": dict(rejected),
        "stages_ms": {stage: _ms(clock.samples.get(stage, [])) for stage in STAGES},
        "latency_ms": _ms(latencies),
    }


def render(result: dict) -> str:
    """Human-readable summary of :func:`bench`'s result."""
    lines = [
        f"{result['video']}: {result['frames']} frames in {result['seconds']} s = {result['fps']} frames/s "
        f"on {result['cores']} core(s), {result['backend']}, detection every {result['detect_every']} frames",
        f"CPU {result['cpu_percent']} %, RSS {result['rss_mb']} MB (peak {result['peak_rss_mb']} MB)",
        f"face found in {result['frames_with_face_pct']} % of frames, {result['faces_per_frame']} faces/frame, "
        f"{result['batches']} batches, rejected by the quality gate: {result['rejected'] or 'none'}",
        f"{'stage':<8} {'n':>6} {'p50 ms':>8} {'p95 ms':>8}",
    ]
    for stage, s in [*result["stages_ms"].items(), ("latency", result["latency_ms"])]:
        if s["n"]:
            lines.append(f"{stage:<8} {s['n']:>6} {s['p50']:>8.2f} {s['p95']:>8.2f}")
    return "\n".join(lines)


def write_json(result: dict, path: Path) -> None:
    path.write_text(json.dumps(result, indent=2) + "\n")

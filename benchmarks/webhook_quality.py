"""What the live quality measures add to Label Studio's annotation webhooks: ``POST /webhook`` latency with
the quality measures on and off, and how fast the measuring keeps up.

The backend (``create_app`` on uvicorn, in this process, on loopback; no Redis, no worker: the webhook needs
neither) receives ``--events`` ``ANNOTATION_CREATED`` events as Label Studio 1.23 sends them: the annotation
with its regions (640x480, three per task, brush masks and polygons in turn, as
:func:`exporters.synthetic.make_corrected_export` makes them) and the task without its predictions, which the
measuring thread reads from a stand-in Label Studio client that answers at once. The events are sent one
after the other, as fast as the backend answers, first with the quality measures off (their queueing
replaced by nothing), then on; the measuring thread runs beside the requests, so its share of the CPU (the
GIL) counts in the latencies.

    .venv/bin/python benchmarks/webhook_quality.py [--events 500]
Writes ``benchmarks/results/webhook_quality.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_result  # noqa: E402
from exporters.synthetic import make_corrected_export  # noqa: E402

GOAL_MS = 5.0
WARM_UP = 20  # events sent first, not timed (the measuring process starts, the compiled loops load)


class IdleRunner:
    """A job runner with no jobs: the webhook never submits one."""

    where = "none"

    def ping(self) -> None: ...
    def stats(self) -> dict[str, dict[str, int]]:
        return {}

    def worker_count(self) -> int:
        return 0

    def close(self) -> None: ...


class StandInLabelStudio:
    """``label_studio_sdk``'s ``client.predictions.list(task=...)``, answered from the generated export."""

    def __init__(self, tasks: list[dict[str, Any]]) -> None:
        self.by_task = {t["id"]: t["predictions"] for t in tasks}
        self.predictions = self

    def __call__(
        self, url: str
    ) -> StandInLabelStudio:  # the client factory (pickled to the measuring process)
        return self

    def list(self, project: Any = None, task: Any = None) -> list[dict[str, Any]]:
        return copy.deepcopy(self.by_task.get(task, []))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def main() -> int:
    import httpx
    import uvicorn

    from groundlabel.settings import Settings
    from labeling_backend.app import create_app

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    tasks, _ = make_corrected_export(args.events + WARM_UP, seed=args.seed)
    bodies = [
        json.dumps(
            {
                "action": "ANNOTATION_CREATED",
                "project": {"id": 1},
                "annotation": {**t["annotations"][0], "task": t["id"]},
                "task": {"id": t["id"], "data": t["data"], "project": 1},
            }
        ).encode()
        for t in tasks
    ]
    env = {"LABEL_STUDIO_URL": "http://label-studio.invalid:8080", "LABEL_STUDIO_API_KEY": "k" * 40}
    settings = Settings.from_env(env, model_version="bench")
    app = create_app(settings, runner=IdleRunner(), model_version="bench")
    state = app.state.backend
    state.quality._client_factory = StandInLabelStudio(tasks)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)

    queue_event = state.quality.annotation_event
    results: dict[str, dict[str, Any]] = {}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        headers = {"Content-Type": "application/json"}
        for body in bodies[:WARM_UP]:
            client.post("/webhook", content=body, headers=headers)
        bodies = bodies[WARM_UP:]
        state.quality.drain(60)
        for mode in ("off", "on"):
            state.quality.annotation_event = queue_event if mode == "on" else (lambda *a, **k: True)
            seen = state.quality._events["measured"]
            latencies = []
            started = time.perf_counter()
            for body in bodies:
                t0 = time.perf_counter()
                response = client.post("/webhook", content=body, headers=headers)
                latencies.append((time.perf_counter() - t0) * 1000)
                assert response.status_code == 201, response.text
            sent = time.perf_counter() - started
            state.quality.drain(600)
            measured_in = time.perf_counter() - started
            results[mode] = {
                "p50_ms": round(statistics.median(latencies), 2),
                "p90_ms": round(percentile(latencies, 0.9), 2),
                "p99_ms": round(percentile(latencies, 0.99), 2),
                "sent_s": round(sent, 2),
                "measured": state.quality._events["measured"] - seen,
                "measured_all_s": round(measured_in, 2),
            }
    server.should_exit = True
    thread.join(10)
    added = results["on"]["p50_ms"] - results["off"]["p50_ms"]
    body_kb = statistics.mean(len(b) for b in bodies) / 1024
    print(
        f"webhook latency: {args.events} ANNOTATION_CREATED events (640x480, 3 regions, half brush; "
        f"{body_kb:.0f} KB each), one at a time; goal: adds < {GOAL_MS:g} ms p50"
    )
    header = ("quality", "p50 ms", "p90 ms", "p99 ms", "sent s", "measured", "done s")
    print(f"{header[0]:<8} " + " ".join(f"{h:>{9 if h == 'measured' else 7}}" for h in header[1:]))
    for mode, r in results.items():
        print(
            f"{mode:<8} {r['p50_ms']:>7.2f} {r['p90_ms']:>7.2f} {r['p99_ms']:>7.2f} {r['sent_s']:>7.2f} "
            f"{r['measured']:>9} {r['measured_all_s']:>7.2f}"
        )
    print(f"added p50: {added:.2f} ms ({'met' if added < GOAL_MS else 'MISSED'})")
    write_result(
        Path(__file__).resolve().parent / "results" / "webhook_quality.json",
        {
            "events": args.events,
            "body_kb": round(body_kb, 1),
            "goal_ms": GOAL_MS,
            "results": results,
            "added_p50_ms": round(added, 2),
        },  # fmt: skip
    )
    return 0 if results["on"]["measured"] == args.events else 1


if __name__ == "__main__":
    sys.exit(main())

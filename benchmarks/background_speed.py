"""*Retrieve Predictions* on a whole project against a real Label Studio: the click, the background run
that writes the rest, and what an annotator's interactive request waits meanwhile.

A real Label Studio (``.ls-venv``, headless on SQLite, as the tests start it) gets a project of ``--tasks``
generated images served from local files; ``groundlabel serve`` runs GEM on the in-repo tiny random CLIP,
with its in-process runner or on Redis with ``--workers`` real ``groundlabel worker`` processes
(``--runner redis``). The click is Label Studio's own Data Manager action, with the backend's deadline at
``--deadline`` seconds (85 in production). Measured:

- Label Studio's request (the click: the backend's answer, then Label Studio saving what it holds), the
  tasks answered in it, when the backend answered, the time from the click to the last prediction
  written (Label Studio's or the background run's) and the background run's tasks written per second;
- one prediction per task in Label Studio at the end (duplicates are counted);
- single-task interactive requests (a typed prompt, a new image each) one at a time: idle before the click,
  and while the background run writes (median, 90th percentile, and their ratio).

    .venv/bin/python benchmarks/background_speed.py --tasks 10000
    .venv/bin/python benchmarks/background_speed.py --tasks 1000 --runner redis --workers 1

Prints a table and writes ``benchmarks/results/background_speed.json`` with the machine.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tests' Label Studio, Redis and process helpers
sys.path.insert(0, str(REPO))

from benchmarks.common import write_result  # noqa: E402

CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<BrushLabels name="mask" toName="image" model_score_threshold="0.0">'
    '<Label value="Thing"/></BrushLabels></View>'
)
INTERACTIVE_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<TextArea name="prompt" toName="image" editable="true"/>'
    '<BrushLabels name="mask" toName="image" model_score_threshold="0.0">'
    '<Label value="Thing"/></BrushLabels></View>'
)


def _png_uri(seed: int) -> str:
    from conftest import png_bytes

    return "data:image/png;base64," + base64.b64encode(png_bytes(40, 32, seed=seed)).decode()


def _interactive(client, backend: str, seed: int) -> float:
    body = {
        "tasks": [{"id": 50_000_000 + seed, "data": {"image": _png_uri(seed)}}],
        "label_config": INTERACTIVE_CONFIG,
        "params": {
            "context": {
                "result": [
                    {
                        "type": "textarea",
                        "from_name": "prompt",
                        "to_name": "image",
                        "value": {"text": ["thing"]},
                    }
                ]
            }
        },
    }
    start = time.perf_counter()
    response = client.post(backend + "/predict", json=body, timeout=60)
    seconds = time.perf_counter() - start
    assert response.status_code == 200 and response.json()["results"][0]["result"], response.text[:300]
    return seconds


def _summary(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {
        "n": len(values),
        "median_s": round(statistics.median(values), 4),
        "p90_s": round(values[min(len(values) - 1, int(0.9 * len(values)))], 4),
    }


def main(argv: list[str] | None = None) -> int:
    import httpx
    from conftest import TINY_GEM_CONFIG, RedisServer, WorkerProcess, clean_env, png_bytes, serve_process
    from labelstudio_server import require_label_studio, shared_label_studio

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000, help="tasks in the project (default 10000)")
    parser.add_argument("--runner", choices=("inprocess", "redis"), default="inprocess")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="in-process children (GROUNDLABEL_WORKERS_INPROCESS; two or more keep one for interactive "
        "requests), or groundlabel worker processes on Redis (default 1)",
    )
    parser.add_argument(
        "--interactive-worker",
        action="store_true",
        help="on Redis, one more worker listening on the interactive queue only",
    )
    parser.add_argument("--deadline", type=float, default=85.0, help="GROUNDLABEL_PREDICT_TIMEOUT (s)")
    parser.add_argument("--idle-requests", type=int, default=15, help="interactive requests before the click")
    parser.add_argument("--busy-requests", type=int, default=30, help="interactive requests during the run")
    args = parser.parse_args(argv)

    require_label_studio()
    ls = shared_label_studio()
    tmp = Path(tempfile.mkdtemp(prefix="groundlabel-bg-bench-"))
    (tmp / "tinyclip.json").write_text(json.dumps(TINY_GEM_CONFIG))
    project = ls.create_project(f"background benchmark {args.tasks}", CONFIG)
    folder = f"bench{project}"
    ls.add_local_storage(project, folder)
    for i in range(args.tasks):
        Path(ls.files_root, folder, f"img{i}.png").write_bytes(png_bytes(40, 32, seed=i))
    tasks = [{"image": f"/data/local-files/?d={folder}/img{i}.png"} for i in range(args.tasks)]
    for start in range(0, len(tasks), 2000):
        ls.api_json("POST", f"/api/projects/{project}/import", json=tasks[start : start + 2000])
    print(f"project {project}: {args.tasks} tasks imported", flush=True)

    env = clean_env(
        {
            "GROUNDLABEL_GEM_MODEL_CONFIG": str(tmp / "tinyclip.json"),
            "GROUNDLABEL_GEM_PRETRAINED": "none",
            "GROUNDLABEL_GEM_IMAGE_SIZE": "64",
            "GROUNDLABEL_DEVICE": "cpu",
            "GROUNDLABEL_CPU_PRECISION": "fp32",
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "LABEL_STUDIO_URL": ls.url,
            "LABEL_STUDIO_API_KEY": ls.personal_access_token(),
            "GROUNDLABEL_PREDICT_TIMEOUT": str(args.deadline),
            "GROUNDLABEL_MAX_TASKS": str(max(10_000, args.tasks)),
            "GROUNDLABEL_WORKERS_INPROCESS": str(args.workers),
        }
    )
    redis = workers = None
    if args.runner == "redis":
        redis = RedisServer()
        env["REDIS_URL"] = redis.url
        workers = [
            WorkerProcess(redis.url, env, log_path=tmp / f"worker{i}.log") for i in range(args.workers)
        ]
        if args.interactive_worker:
            only = ["--queues", "interactive"]
            workers.append(WorkerProcess(redis.url, env, extra_args=only, log_path=tmp / "interactive.log"))
        for worker in workers:
            worker.wait_ready(redis.url, timeout=240)
    result: dict = {
        "tasks": args.tasks,
        "runner": args.runner,
        "workers": args.workers,
        "interactive_worker": args.interactive_worker,
        "deadline_s": args.deadline,
    }
    try:
        with serve_process(env, tmp / "serve.log") as backend, httpx.Client() as client:
            for seed in range(3):  # warm the engines and the text cache
                _interactive(client, backend, 900_000 + seed)
            idle = [_interactive(client, backend, seed) for seed in range(args.idle_requests)]
            ml = ls.api_json("POST", "/api/ml", json={"url": backend, "project": project, "title": "gl"})
            assert ml.get("state") != "ER", ml
            clicked, clicked_at = time.monotonic(), time.time()
            with ThreadPoolExecutor(1) as pool:  # Label Studio's request, while this thread watches
                click = pool.submit(ls.retrieve_predictions, project, timeout=3600)
                run, busy, last_print = None, [], time.monotonic()
                while True:
                    runs = client.get(backend + "/background", timeout=30).json()["runs"]
                    run = runs[0] if runs else None
                    running = run is not None and run["status"] == "running"
                    if click.done() and not running:
                        break
                    if running and len(busy) < args.busy_requests:
                        busy.append(_interactive(client, backend, 1000 + len(busy)))
                    else:
                        time.sleep(0.5)
                    if time.monotonic() - last_print > 30:
                        state = f"{run['written']} of {run['total']} written" if run else "no run yet"
                        print(f"  {time.monotonic() - clicked:6.0f} s: {state}; click done: {click.done()}")
                        last_print = time.monotonic()
                click_s = click.result()
            done_s = time.monotonic() - clicked
            answered_in_click = args.tasks - (run["total"] if run else 0)
            print(f"Label Studio's request: {click_s:.1f} s, {answered_in_click} answered in it", flush=True)
        counts = Counter(
            p["task"] for p in ls.api_json("GET", "/api/predictions", params={"project": project})
        )
    finally:
        for worker in workers or []:
            worker.kill()
        if redis is not None:
            redis.stop()

    written = run["written"] if run else 0
    result.update(
        click_s=round(click_s, 2),
        answered_in_click=answered_in_click,
        background_written=written,
        background_failed=run["failed"] if run else 0,
        backend_answered_after_s=round(run["created"] - clicked_at, 2) if run else None,
        click_to_last_written_s=round(done_s, 2),
        background_written_per_s=round(written / max(run["updated"] - run["created"], 1e-9), 1)
        if run
        else None,
        tasks_with_prediction=len(counts),
        duplicates=sum(c - 1 for c in counts.values()),
        interactive_idle=_summary(idle),
        interactive_during_run=_summary(busy) if busy else None,
    )
    if busy:
        result["interactive_ratio_median"] = round(
            result["interactive_during_run"]["median_s"] / result["interactive_idle"]["median_s"], 2
        )
    print()
    print(f"{'what':<44} {'value':>12}")
    for key in (
        "tasks", "runner", "workers", "click_s", "answered_in_click", "background_written",
        "background_failed", "backend_answered_after_s", "click_to_last_written_s",
        "background_written_per_s", "tasks_with_prediction", "duplicates",
    ):  # fmt: skip
        print(f"{key:<44} {result[key]!s:>12}")
    print(f"{'interactive idle, median / p90 (s)':<44} {result['interactive_idle']['median_s']:>6} / "
          f"{result['interactive_idle']['p90_s']}")  # fmt: skip
    if busy:
        during = result["interactive_during_run"]
        what = "interactive during the run, median / p90 (s)"
        print(f"{what:<44} {during['median_s']:>6} / {during['p90_s']}")
        print(f"{'ratio of the medians':<44} {result['interactive_ratio_median']:>12}")
    out = write_result(REPO / "benchmarks" / "results" / "background_speed.json", result)
    print(f"\nwritten {out.relative_to(REPO)}")
    return 0 if result["duplicates"] == 0 and len(counts) == args.tasks else 1


if __name__ == "__main__":
    sys.exit(main())

"""The backend never imports torch: not on import, and not while running jobs in-process (no Redis)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

pytestmark = pytest.mark.integration


def run_python(code: str, env: dict[str, str] | None = None, timeout: float = 240) -> str:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("REDIS_URL", None)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full_env,
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_backend_modules_import_no_torch():
    out = run_python("""
        import sys
        import labeling_backend.app, labeling_backend.routes, labeling_backend.queue
        import groundlabel_cli.serve, workers.inprocess, labeling_backend.service, workers.jobs
        import workers.worker
        from groundlabel_cli.main import build_parser
        build_parser()
        heavy = [m for m in ("torch", "open_clip", "transformers", "cv2") if m in sys.modules]
        print(",".join(heavy) or "none")
    """)
    assert out == "none"


@pytest.mark.slow
def test_inprocess_jobs_run_in_a_child_process(tiny_gem_env):
    from conftest import POLYGON_CONFIG, png_data_uri

    body = {
        "tasks": [
            {"id": 1, "data": {"image": png_data_uri(seed=1)}},
            {"id": 2, "data": {"image": "data:image/png;base64,AAAA"}},
        ],
        "label_config": POLYGON_CONFIG,
    }
    out = run_python(
        f"""
        import json, sys
        from fastapi.testclient import TestClient
        from groundlabel_cli.serve import build_app
        from groundlabel.settings import Settings
        settings = Settings.from_env(predict_timeout=180, model_version="inproc")
        assert settings.queue.redis_url is None
        with TestClient(build_app(settings)) as client:
            health = client.get("/health").json()
            first = client.post("/predict", json={body!r}).json()
            second = client.post("/predict", json={body!r}).json()
        print(json.dumps({{"torch": "torch" in sys.modules, "health": health, "first": first,
                          "second": second}}))
    """,
        env=tiny_gem_env,
    )
    data = json.loads(out)
    assert data["torch"] is False
    assert data["health"]["queue"] == "in-process"
    first = data["first"]
    assert first["results"][0]["result"] and first["results"][0]["model_version"] == "inproc"
    assert first["results"][1] == [] and "cannot fetch image" in first["errors"][0]["error"]
    assert data["second"]["results"][0] == first["results"][0]


@pytest.mark.slow
def test_inprocess_interactive_jobs_go_before_queued_batches(tiny_gem_env):
    """One child, six batch jobs queued, then an interactive job: it runs as soon as the child is free."""
    import time

    from conftest import POLYGON_CONFIG, png_data_uri

    from groundlabel.protocol import JobPayload
    from groundlabel.settings import Settings
    from groundlabel.spec import read_spec
    from workers.inprocess import InProcessRunner

    settings = Settings.from_env(tiny_gem_env)
    spec = read_spec(POLYGON_CONFIG, settings)
    runner = InProcessRunner(settings, workers=1, warm_up=False)
    try:

        def submit(i: int, interactive: bool) -> str:
            task = {"id": i, "data": {"image": png_data_uri(seed=i)}}
            job_id, taken = runner.submit(JobPayload([task], spec), [f"key{i}"], interactive=interactive)
            assert taken == [0]
            return job_id

        batches = [submit(i, False) for i in range(6)]
        first = runner.poll([batches[0]])[batches[0]]
        assert first.status == "pending" and first.detail == "running"
        assert runner.poll([batches[1]])[batches[1]].detail == "queued"
        urgent = submit(99, True)
        deadline = time.monotonic() + 300
        jobs = [*batches, urgent]
        while any(s.status == "pending" for s in runner.poll(jobs).values()):
            assert time.monotonic() < deadline, runner.poll(jobs)
            time.sleep(0.2)
        assert all(s.status == "finished" for s in runner.poll(jobs).values())
        order = sorted(jobs, key=lambda j: runner._jobs[j].ended)
        assert order[:2] == [batches[0], urgent], order  # right after the batch job that was running
    finally:
        runner.close()


@pytest.mark.slow
def test_serve_keeps_one_of_two_children_for_interactive_requests(tiny_gem_env):
    from conftest import POLYGON_CONFIG, png_data_uri

    from groundlabel.protocol import JobPayload
    from groundlabel.settings import Settings
    from groundlabel.spec import read_spec
    from workers.inprocess import InProcessRunner

    settings = Settings.from_env(tiny_gem_env)
    spec = read_spec(POLYGON_CONFIG, settings)
    runner = InProcessRunner(settings, workers=2, warm_up=False, reserve_interactive=True)
    try:
        payload = JobPayload([{"id": 1, "data": {"image": png_data_uri(seed=1)}}], spec)
        batches = [runner.submit(payload, [f"key{i}"], interactive=False)[0] for i in range(4)]
        details = [s.detail for s in runner.poll(batches).values()]
        assert details.count("running") == 1, details  # the other child waits for interactive work
        urgent = runner.submit(payload, ["urgent"], interactive=True)[0]
        assert runner.poll([urgent])[urgent].detail == "running"  # at once, no batch job ahead of it
    finally:
        runner.close()

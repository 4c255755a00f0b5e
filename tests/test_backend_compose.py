"""docker-compose.yml and the Dockerfile are well-formed and wire the services as documented."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_compose_file_structure():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "label-studio", "backend", "worker", "trainer"}
    # The same Label Studio release as the tests' locked one.
    assert services["label-studio"]["image"] == "heartexlabs/label-studio:1.23.2"
    backend, worker = services["backend"], services["worker"]
    assert backend["build"]["target"] == "backend" and worker["build"]["target"] == "worker"
    assert backend["command"][:2] == ["groundlabel", "serve"] and "0.0.0.0" in backend["command"]
    assert worker["command"] == ["groundlabel", "worker"]
    trainer = services["trainer"]
    assert trainer["build"]["target"] == "worker"
    assert trainer["command"] == ["groundlabel", "worker", "--queues", "train"]
    # The trainer writes the model store; the prediction workers only read it.
    assert "models:/models" in trainer["volumes"] and "models:/models:ro" in worker["volumes"]
    for service in (backend, worker, trainer):
        assert service["environment"]["REDIS_URL"].startswith("redis://")
        assert service["environment"]["REDIS_URL"].endswith("@redis:6379/0")
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    assert "replicas" in worker["deploy"]
    # Secrets come from the environment, never from the file.
    for service in services.values():
        for key, value in (service.get("environment") or {}).items():
            if any(word in key for word in ("PASS", "TOKEN", "API_KEY")) and "ENABLE" not in key:
                assert str(value).startswith("${"), key


def test_dockerfile_has_backend_without_torch_and_worker_with_extras():
    text = (REPO / "docker" / "Dockerfile").read_text()
    backend = text.split("AS backend", 1)[1].split("FROM", 1)[0]
    worker = text.split("AS worker", 1)[1]
    # Each image installs its lock with hashes, then the project alone (no resolution of its own).
    assert "--require-hashes --no-deps -r requirements/backend.txt" in backend
    assert "pip install --no-deps --no-build-isolation ." in backend and "worker" not in backend
    assert "--require-hashes --no-deps -r requirements/worker.txt" in worker
    assert '--no-deps --no-build-isolation ".[worker,s3]"' in worker
    assert "--require-hashes --no-deps -r requirements/build.txt" in text.split("AS backend", 1)[0]

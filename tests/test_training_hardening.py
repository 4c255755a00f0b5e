"""The training and model-store surface against whoever can write the store or call the backend:

- a pickle placed in the store (a folder, a bucket) as a version's weights never runs, and says why;
- a store file that is valid JSON but not what the store writes is a clear error for its project alone
  (409 from ``/versions?project=``, the base models elsewhere), never a 500 nor another project's failure;
  version names never leave their project's folder, on the CLI too;
- project ids are canonical at the door: one job per project whatever its spelling, 422 for the rest, and
  no ``/metrics`` series for projects nobody has seen;
- the Label Studio token never goes to a host a request named.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from fastapi.testclient import TestClient
from test_training_store import BUCKET, s3_server  # noqa: F401 (the session's S3 server)

from groundlabel.errors import UserError
from groundlabel.model_store import ModelStore, S3Backend, StoreFileError
from groundlabel.settings import Settings
from groundlabel.training_queue import LOCK_PREFIX, STATUS_PREFIX
from groundlabel_cli.main import main
from labeling_backend.app import create_app

BASE = "gem-test-base"
CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<PolygonLabels name="poly" toName="image"><Label value="Thing"/></PolygonLabels></View>'
)


def record(project: str, name: str, weights: str = "model.safetensors", **extra) -> dict:
    """A version record as the store writes it."""
    return {
        "name": name,
        "kind": "lavt",
        "project": project,
        "parent": "lavt-tiny-base",
        "annotation_count": 3,
        "created_at": "2025-01-01T00:00:00+00:00",
        "weights": weights,
        "config": {},
        "metrics": {"base": {"oIoU": 0.1}, "new": {"oIoU": 0.2}},
        "note": "",
        **extra,
    }


@pytest.fixture(params=["folder", "s3"])
def each_store(request, tmp_path) -> ModelStore:
    """An empty store in a folder, then in a bucket of moto's S3 server (a fresh prefix per test)."""
    if request.param == "folder":
        return ModelStore(tmp_path / "store")
    env = request.getfixturevalue("s3_server")
    url = f"s3://{BUCKET}/h-{tmp_path.name}"
    cache = str(tmp_path / "cache")
    return ModelStore.from_url(
        url,
        Settings.from_env(
            {**env, "GROUNDLABEL_MODEL_STORE": url, "GROUNDLABEL_MODEL_STORE_CACHE": cache}
        ).training.s3,
    )


def safetensors_file(path):
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(4, np.float32)}, str(path))
    return path


# -- a pickle in the store ----------------------------------------------------------------------------


class _Payload:
    """Unpickled with code execution, it creates the folder ``marker``."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _engine_settings(kept: ModelStore, tmp_path, request, base) -> Settings:
    """Worker settings reading the store ``kept`` with a tiny base LAVT."""
    env: dict[str, str] = {"GROUNDLABEL_MODEL_STORE": str(kept.root)}
    if isinstance(kept.backend, S3Backend):
        env.update(request.getfixturevalue("s3_server"))
        env["GROUNDLABEL_MODEL_STORE_CACHE"] = str(tmp_path / "worker-cache")
    return Settings.from_env(env).with_(lavt_enabled=True, lavt_checkpoint=str(base), device="cpu")


@pytest.mark.parametrize("weights_file", ["model.pth", "model.safetensors"], ids=["pth", "disguised"])
def test_a_pickle_placed_in_the_store_never_runs(each_store, tmp_path, request, caplog, weights_file):
    """Whoever writes the store puts a crafted pickle as a version's weights (named as the old
    ``model.pth``, or disguised as safetensors) and promotes it: the store refuses to hand it out, a worker
    serving the project keeps the base LAVT and logs why, a training job starting from it fails with the
    reason, and nothing of the pickle ever runs."""
    torch = pytest.importorskip("torch")
    from test_training_lavt import tiny_base_checkpoint

    from workers import engines
    from workers.models.lavt.weights import read_checkpoint
    from workers.training.lavt import current_model

    store = each_store
    marker = tmp_path / "the-pickle-ran"
    crafted = tmp_path / "crafted.pth"
    torch.save({"model": _Payload(marker), "bert_model": {}}, crafted)
    name = "lavt-tiny-p9-v1"
    meta = json.dumps(record("9", name, weights=weights_file)).encode()
    assert store.backend.put_version("9", name, crafted, weights_file, meta)
    store.promote("9", name, "placed by whoever can write the store")

    with pytest.raises(StoreFileError, match="refused to load .*safetensors"):
        store.weights_path(store.promoted("9"))
    base = tiny_base_checkpoint(tmp_path / "base.pth")
    settings = _engine_settings(store, tmp_path, request, base)
    engines.configure(settings)
    try:
        with caplog.at_level(logging.WARNING):
            assert engines.get_lavt_engine("9").model_version == "lavt-tiny-base"
        assert "refused to load" in caplog.text and "project 9 gets the base models" in caplog.text
        with pytest.raises(StoreFileError, match="safetensors"):  # a training job starting from it
            current_model(store, "9", settings.engines)
    finally:
        engines.configure(Settings())
    with pytest.raises(UserError, match="refused: it holds objects other than tensors"):
        read_checkpoint(crafted)  # the same file named by an operator is not unpickled either
    assert not marker.exists(), "the pickle's code ran"


# -- store files that are valid JSON but not what the store writes -------------------------------------

BAD_POINTERS = {
    "a list": [],
    "dot-dot": {"version": ".."},
    "a number": {"version": 5},
    "a path": {"version": "../3/lavt-tiny-p3-v1"},
    "history not a list": {"version": None, "history": "x"},
    "history entry": {"version": None, "history": [1]},
}
BAD_RECORDS = {
    "a list": [],
    "another name": record("9", "lavt-tiny-p9-v7"),
    "another project": record("3", "lavt-tiny-p9-v1"),
    "unknown kind": record("9", "lavt-tiny-p9-v1", kind="evil"),
    "weights outside": record("9", "lavt-tiny-p9-v1", weights="../../3/x"),
    "count a string": record("9", "lavt-tiny-p9-v1", annotation_count="3"),
    "metrics a list": record("9", "lavt-tiny-p9-v1", metrics={"new": [1]}),
}


def _break_project_9(kept: ModelStore, tmp_path, pointer=None, meta=None) -> None:
    """Project 9 holds one version and a promotion pointer, one of them replaced by ``pointer``/``meta``."""
    name = "lavt-tiny-p9-v1"
    body = json.dumps(meta if meta is not None else record("9", name)).encode()
    weights = safetensors_file(tmp_path / "w9.safetensors")
    assert kept.backend.put_version("9", name, weights, "model.safetensors", body)
    kept.backend.write_pointer(
        "9", json.dumps(pointer if pointer is not None else {"version": name}).encode()
    )


def _add_good_version(kept: ModelStore, tmp_path):
    """Project 3's version, promoted."""
    weights = safetensors_file(tmp_path / "w3.safetensors")
    version = kept.add(
        project="3", kind="lavt", variant="tiny", weights=weights, parent=None, annotation_count=1
    )
    kept.promote("3", version.name, "test")
    return version


@pytest.mark.parametrize(
    ("pointer", "meta"),
    [*((p, None) for p in BAD_POINTERS.values()), *((None, m) for m in BAD_RECORDS.values())],
    ids=[*(f"promoted.json {k}" for k in BAD_POINTERS), *(f"meta.json {k}" for k in BAD_RECORDS)],
)
def test_a_bad_store_file_is_an_error_for_its_project_alone(each_store, tmp_path, pointer, meta):
    store = each_store
    other = _add_good_version(store, tmp_path)
    _break_project_9(store, tmp_path, pointer, meta)
    with pytest.raises(StoreFileError, match=r"(promoted|meta)\.json is not a valid"):
        store.promoted("9")
    assert store.promoted("3") == other and store.projects() == ["3", "9"]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("pointer", "meta"),
    [(BAD_POINTERS["a list"], None), (BAD_POINTERS["dot-dot"], None), (None, BAD_RECORDS["a list"])],
    ids=["promoted.json []", "promoted.json ..", "meta.json []"],
)
def test_the_backend_answers_every_project_despite_a_bad_store_file(
    redis_url, tmp_path, caplog, pointer, meta
):
    store = ModelStore(tmp_path / "store")
    good = _add_good_version(store, tmp_path)
    _break_project_9(store, tmp_path, pointer, meta)
    (store.root / "meta.json").write_text(json.dumps(record("9", "outside")))  # what ".." would read
    settings = Settings.from_env({}, redis_url=redis_url, model_store=str(store.root), predict_timeout=0.2)
    with TestClient(create_app(settings, model_version=BASE), raise_server_exceptions=False) as client:
        with caplog.at_level(logging.WARNING):
            setup = client.post("/setup", json={"project": "9.1", "schema": CONFIG})
        assert setup.status_code == 200 and setup.json()["model_version"].startswith(BASE + "-cfg")
        assert "project 9 is served by the base models" in caplog.text
        task = {"id": 1, "data": {"image": "http://images.invalid/1.png"}}
        predict = client.post("/predict", json={"tasks": [task], "label_config": CONFIG, "project": "9.1"})
        assert predict.status_code == 200 and predict.json()["model_version"].startswith(BASE)
        served = client.post("/setup", json={"project": "3.1", "schema": CONFIG}).json()["model_version"]
        assert served.startswith(good.name + "-cfg")
        alone = client.get("/versions", params={"project": "9"})
        assert alone.status_code == 409 and ".json is not a valid" in alone.json()["detail"]
        every = client.get("/versions")
        assert every.status_code == 200, every.text
        assert every.json()["versions"] == [BASE, good.name] and every.json()["errors"][0]["project"] == "9"
        assert "outside" not in every.text
        assert client.get("/versions", params={"project": "3"}).json()["versions"] == [BASE, good.name]


def test_version_names_never_leave_the_project_folder_on_the_cli(tmp_path, capsys):
    store = ModelStore(tmp_path / "store")
    good = _add_good_version(store, tmp_path)
    store.promote("3", None, "back to the base models")
    (store.root / "meta.json").write_text(json.dumps(record("9", "..")))
    root = ["models", "--store", str(store.root)]
    for name in ("..", ".", "../3/" + good.name, "a/b"):
        assert main([*root, "promote", "--project", "9", name]) == 2
        assert "is not a version name" in capsys.readouterr().err
    assert main([*root, "promote", "--project", "0009", good.name]) == 2
    assert "not a valid project id" in capsys.readouterr().err
    assert store.promoted_name("9") is None and not (store.root / "9" / "promoted.json").exists()
    _break_project_9(store, tmp_path, pointer=[])
    assert main([*root, "list"]) == 1  # project 3 is listed, project 9 named as broken
    out = capsys.readouterr()
    assert good.name in out.out and "project 9 left out" in out.err
    assert main([*root, "list", "--project", "9"]) == 2


# -- project ids at the door ---------------------------------------------------------------------------


@pytest.mark.integration
def test_project_ids_are_canonical_at_the_door(redis_url, tmp_path):
    settings = Settings.from_env({}, redis_url=redis_url, model_store=str(tmp_path / "store"))
    with TestClient(create_app(settings, model_version=BASE)) as client:
        jobs = set()
        for spelling in ("41", "41.1700000000"):
            answer = client.post("/train", json={"project": spelling})
            assert answer.status_code == 201, answer.text
            jobs.add(answer.json()["job"])
        pressed = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 41}})
        jobs.add(pressed.json()["job"])
        assert len(jobs) == 1  # one job for project 41, however it is spelled
        for alias in ("0041", "00041", "4_1", "41.5x", " 41", "True", "None", "con", "10**30", str(2**31)):
            answer = client.post("/train", json={"project": alias})
            assert answer.status_code == 422, (alias, answer.text)
        for alias in (None, True, "41", 41.0, 10**30, 0, -3, "0041", [41]):
            answer = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": alias}})
            expected = 201 if alias == "41" else 422
            assert answer.status_code == expected, (alias, answer.text)
        assert client.get("/versions", params={"project": "0041"}).status_code == 422
        assert client.get("/versions", params={"project": "41"}).status_code == 200
        (job,) = jobs
        assert client.post("/job_status", json={"job": job, "project": "41"}).status_code == 200
        assert client.post("/job_status", json={"job": job, "project": 42}).status_code == 410
        assert client.post("/job_status", json={"job": job, "project": "0041"}).status_code == 422
        task = {"id": 1, "data": {"image": "http://images.invalid/1.png"}}
        assert client.post("/predict", json={"tasks": [task], "project": "4_1"}).status_code == 422
        assert client.post("/setup", json={"project": "0041", "schema": CONFIG}).status_code == 422
        connection = client.app.state.backend.training.connection
        assert sorted(k.decode() for k in connection.keys(LOCK_PREFIX + "*")) == [LOCK_PREFIX + "41"]
        assert sorted(k.decode() for k in connection.keys(STATUS_PREFIX + "*")) == [STATUS_PREFIX + "41"]
        # Nobody has seen project 41 (no training job read it from Label Studio, the store has none of
        # it): asking to train it adds no series.
        assert 'project="41"' not in client.get("/metrics").text


# -- the Label Studio token ----------------------------------------------------------------------------


class _Recorder(BaseHTTPRequestHandler):
    """Answers 404 to everything and records the ``Authorization`` header of each request."""

    seen: list[str | None]

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.seen.append(self.headers.get("Authorization"))  # type: ignore[attr-defined]
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def listening_host():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.seen = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.integration
def test_the_token_never_goes_to_a_host_a_request_named(redis_url, tmp_path, start_worker, listening_host):
    """A training worker without LABEL_STUDIO_URL, a /setup naming a listening host that the operator did
    not allow, then /train: the job fails saying why, and the host received nothing."""
    port = listening_host.server_address[1]
    env = {
        "GROUNDLABEL_MODEL_STORE": str(tmp_path / "store"),
        "LABEL_STUDIO_URL": "",
        "LABEL_STUDIO_API_KEY": "secret-token-0123456789",
        "GROUNDLABEL_ALLOWED_HOSTS": "*",  # images from anywhere: still no token for a request's host
    }
    worker = start_worker(redis_url, env, extra_args=["--queues", "train"])
    worker.wait_ready(redis_url)
    settings = Settings.from_env({}, redis_url=redis_url, model_store=str(tmp_path / "store"))
    with TestClient(create_app(settings, model_version=BASE)) as client:
        setup = {"project": "5.1", "schema": CONFIG, "hostname": f"http://127.0.0.1:{port}"}
        assert client.post("/setup", json=setup).status_code == 200
        job = client.post("/train", json={"project": "5.1"}).json()["job"]
        deadline = time.monotonic() + 60
        while (status := client.post("/job_status", json={"job": job}).json())["job_status"] != "failed":
            assert time.monotonic() < deadline, (status, worker.output())
            time.sleep(0.2)
    assert "listed by name in GROUNDLABEL_ALLOWED_HOSTS" in status["reason"], status
    assert listening_host.seen == []


def test_the_token_goes_to_label_studio_url_or_a_host_the_operator_named(listening_host, tmp_path):
    from groundlabel_cli.training import export_project

    port = listening_host.server_address[1]
    here = f"http://127.0.0.1:{port}"
    key = "secret-token-0123456789"
    for env, request_url in (
        ({"LABEL_STUDIO_URL": here}, "http://127.0.0.2:9"),  # the request's host is ignored
        ({"GROUNDLABEL_ALLOWED_HOSTS": f"127.0.0.1:{port}"}, here),  # named by the operator
    ):
        settings = Settings.from_env({**env, "LABEL_STUDIO_API_KEY": key})
        listening_host.seen.clear()
        with pytest.raises(UserError):  # the recorder answers 404: no such project
            export_project("5", settings, tmp_path / "out", label_studio_url=request_url)
        assert listening_host.seen and all(key in (h or "") for h in listening_host.seen)
    for allowed in ("*", "*.0.0.1", "127.0.0.1:1"):  # patterns, or the host on another port, are not enough
        settings = Settings.from_env({"GROUNDLABEL_ALLOWED_HOSTS": allowed, "LABEL_STUDIO_API_KEY": key})
        listening_host.seen.clear()
        with pytest.raises(UserError, match="listed by name"):
            export_project("5", settings, tmp_path / "out", label_studio_url=here)
        assert listening_host.seen == []


def test_operator_checkpoints_load_with_only_namespace_allowed(tmp_path):
    """An official LAVT checkpoint (optimizer, scheduler, epoch and a pickled ``argparse.Namespace``) loads
    without unpickling code; the same layout with one more global is refused, naming it."""
    import argparse

    torch = pytest.importorskip("torch")
    from workers.models.lavt.weights import read_checkpoint

    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(layer.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.9**epoch)
    layer(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    scheduler.step()
    official = {
        "model": layer.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "epoch": 3,
        "args": argparse.Namespace(lr=5e-5, window12=True, ck_bert="bert-base-uncased", splits=["val"]),
    }
    torch.save(official, tmp_path / "official.pth")
    loaded = read_checkpoint(tmp_path / "official.pth")
    assert loaded["args"].ck_bert == "bert-base-uncased" and loaded["epoch"] == 3
    torch.save({**official, "extra": _Payload(tmp_path / "ran")}, tmp_path / "crafted.pth")
    with pytest.raises(UserError, match="refused.*GLOBAL posix.mkdir"):
        read_checkpoint(tmp_path / "crafted.pth")
    assert not (tmp_path / "ran").exists()

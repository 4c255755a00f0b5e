"""The model store behind one interface, in a folder and in an S3-compatible bucket: immutable versions
(a taken name is refused, half-written versions are invisible), the promotion pointer and its history per
project, rollback, the settings that name a bucket, the CLI, and workers serving a promoted version
downloaded from the bucket.

The bucket lives in moto's standalone S3 server, started once for the session on a free port; boto3 talks
real HTTP to it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import free_port

from groundlabel.errors import UserError
from groundlabel.model_store import CLAIM, META, FolderBackend, ModelStore, S3Backend, store_path
from groundlabel.settings import Settings
from groundlabel_cli.main import main

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

BUCKET = "groundlabel-models"


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3-compatible HTTP server: ``{"endpoint": ..., env of a client}``."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "GROUNDLABEL_S3_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "test-key",
        "AWS_SECRET_ACCESS_KEY": "test-secret",
        "AWS_REGION": "us-east-1",
    }
    settings = Settings.from_env(env).training.s3
    S3Backend(f"s3://{BUCKET}", settings).client.create_bucket(Bucket=BUCKET)
    yield env
    server.stop()


@pytest.fixture(params=["folder", "s3"])
def store(request, tmp_path) -> ModelStore:
    """An empty store of each kind (a fresh prefix of the bucket per test)."""
    if request.param == "folder":
        return ModelStore(tmp_path / "store")
    env = request.getfixturevalue("s3_server")
    url = f"s3://{BUCKET}/t-{tmp_path.name}"
    training = Settings.from_env(
        {**env, "GROUNDLABEL_MODEL_STORE": url, "GROUNDLABEL_MODEL_STORE_CACHE": str(tmp_path / "cache")}
    ).training
    opened = ModelStore.from_settings(training)
    assert isinstance(opened.backend, S3Backend) and opened.root == url
    return opened


def weights(tmp_path, content: bytes, name: str = "w.safetensors"):
    """A safetensors file holding ``content`` as one uint8 tensor."""
    from safetensors.numpy import save_file

    path = tmp_path / name
    save_file({"w": np.frombuffer(content, dtype=np.uint8).copy()}, str(path))
    return path


def stored(path) -> bytes:
    """The ``content`` of a file written by :func:`weights`."""
    from safetensors.numpy import load_file

    return load_file(str(path))["w"].tobytes()


def add(store: ModelStore, tmp_path, project: str = "3", content: bytes = b"weights", **kw):
    return store.add(
        project=project,
        kind=kw.pop("kind", "lavt"),
        variant="tiny",
        weights=weights(tmp_path, content, f"w{len(content)}{project}.safetensors"),
        parent="lavt-tiny-base",
        annotation_count=12,
        metrics={"base": {"oIoU": 0.1}, "new": {"oIoU": 0.3}},
        **kw,
    )


def test_versions_are_immutable_promotions_are_per_project_and_rollback_steps_back(store, tmp_path):
    assert store.projects() == [] and store.versions("3") == [] and store.promoted("3") is None
    v1, v2 = add(store, tmp_path, content=b"one"), add(store, tmp_path, content=b"two")
    other = add(store, tmp_path, project="4", content=b"four", kind="gem")
    assert (v1.name, v2.name, other.name) == ("lavt-tiny-p3-v1", "lavt-tiny-p3-v2", "gem-tiny-p4-v1")
    assert store.projects() == ["3", "4"] and [v.name for v in store.versions("3")] == [v1.name, v2.name]
    record = store.get("3", v1.name)
    assert record == v1 and record.metrics["new"]["oIoU"] == 0.3 and record.weights == "model.safetensors"
    assert stored(store.weights_path(v2)) == b"two" and stored(store.weights_path(v1)) == b"one"

    # A taken name is refused and nothing of the version changes (a writer that lost the race).
    meta = json.dumps({**v1.to_dict(), "note": "overwritten"}).encode()
    evil = weights(tmp_path, b"evil")
    assert not store.backend.put_version("3", v1.name, evil, "model.safetensors", meta)
    assert store.get("3", v1.name).note == "" and stored(store.weights_path(v1)) == b"one"

    store.promote("3", v1.name, "better")
    store.promote("3", v2.name, "better")
    assert store.promoted_name("3") == v2.name and store.promoted_name("4") is None
    assert store.rollback("3") == v1.name and store.promoted("3") == v1
    assert store.rollback("3") is None and store.promoted_name("3") is None
    with pytest.raises(UserError, match="base models already"):
        store.rollback("3")
    assert [e.get("rollback", False) for e in store.history("3")] == [False, False, True, True]
    with pytest.raises(UserError, match="no version"):
        store.promote("3", "lavt-tiny-p3-v9", "typo")
    with pytest.raises(UserError, match="not a valid project"):
        store.versions("../etc")
    pickled = tmp_path / "w.pth"
    pickled.write_bytes(b"\x80\x04K\x01.")  # pickle.dumps(1)
    with pytest.raises(UserError, match="safetensors"):  # a version's weights are safetensors only
        store.add(project="3", kind="lavt", variant="tiny", weights=pickled, parent=None, annotation_count=1)


def test_store_path_takes_a_folder_or_a_file_url_and_sends_buckets_to_the_s3_store():
    assert store_path("file:///srv/models") == store_path("/srv/models")
    with pytest.raises(UserError, match="S3"):
        store_path("s3://bucket/models")


def test_a_half_written_version_is_invisible_and_its_name_stays_taken(store, tmp_path):
    v1 = add(store, tmp_path)
    backend = store.backend
    if isinstance(backend, FolderBackend):  # a writer that died before its rename
        (backend.root / "3" / ".new-abc").mkdir()
        (backend.root / "3" / ".new-abc" / META).write_text("{}")
        (backend.root / "3" / "lavt-tiny-p3-v2").mkdir()  # a folder without a record
    else:  # a writer that died after claiming the name, before the record
        backend.client.put_object(
            Bucket=backend.bucket, Key=backend._key("3", "lavt-tiny-p3-v2", CLAIM), Body=b""
        )
    assert [v.name for v in store.versions("3")] == [v1.name]
    assert add(store, tmp_path, content=b"next").name == "lavt-tiny-p3-v3"  # v2 is never reused


def test_a_broken_record_or_pointer_is_reported_with_its_location(store, tmp_path):
    v1 = add(store, tmp_path)
    backend = store.backend
    if isinstance(backend, FolderBackend):
        (backend.root / "3" / "promoted.json").write_text("{not json")
    else:
        backend.client.put_object(
            Bucket=backend.bucket, Key=backend._key("3", None, "promoted.json"), Body=b"{"
        )
    with pytest.raises(UserError, match="promoted.json is not valid JSON"):
        store.promoted_name("3")
    assert store.get("3", v1.name) == v1


def test_s3_settings_reach_boto3_and_errors_name_the_store(s3_server, tmp_path):
    env = {**s3_server, "GROUNDLABEL_MODEL_STORE": f"s3://{BUCKET}/cli"}
    s3 = Settings.from_env(env).training.s3
    assert s3.endpoint_url == s3_server["GROUNDLABEL_S3_ENDPOINT_URL"] and s3.region == "us-east-1"
    assert "test-secret" not in repr(s3)
    fallback = Settings.from_env({"AWS_ENDPOINT_URL": "http://a:1", "AWS_DEFAULT_REGION": "eu-west-1"})
    assert (fallback.training.s3.endpoint_url, fallback.training.s3.region) == ("http://a:1", "eu-west-1")
    missing = ModelStore.from_url("s3://no-such-bucket-here/x", s3)
    with pytest.raises(UserError, match="s3://no-such-bucket-here/x.*NoSuchBucket"):
        missing.versions("3")
    with pytest.raises(UserError, match="s3://bucket/prefix"):
        ModelStore.from_url("s3:///no-bucket")


def test_models_cli_on_a_bucket(s3_server, tmp_path, monkeypatch, capsys):
    url = f"s3://{BUCKET}/cli-{tmp_path.name}"
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("GROUNDLABEL_MODEL_STORE", url)
    monkeypatch.setenv("GROUNDLABEL_MODEL_STORE_CACHE", str(tmp_path / "cache"))
    store = ModelStore.from_settings(Settings.from_env().training)
    v1 = add(store, tmp_path)
    assert main(["models", "promote", "--project", "3", v1.name]) == 0
    assert store.promoted_name("3") == v1.name
    capsys.readouterr()
    assert main(["models", "list", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["name"] == v1.name and row["promoted"] and row["kind"] == "lavt"
    assert main(["models", "rollback", "--project", "3"]) == 0 and store.promoted_name("3") is None


def test_workers_serve_a_version_promoted_in_a_bucket(s3_server, tmp_path):
    pytest.importorskip("torch")
    from tests.test_training_lavt import stored_checkpoint, tiny_base_checkpoint
    from workers import engines

    url = f"s3://{BUCKET}/serve-{tmp_path.name}"
    env = {**s3_server, "GROUNDLABEL_MODEL_STORE": url, "GROUNDLABEL_MODEL_STORE_CACHE": str(tmp_path / "c")}
    base = tiny_base_checkpoint(tmp_path / "base.pth")
    settings = Settings.from_env(env).with_(lavt_enabled=True, lavt_checkpoint=str(base), device="cpu")
    store = ModelStore.from_settings(settings.training)
    trained = stored_checkpoint(base, tmp_path / "trained.safetensors")
    version = store.add(
        project="7", kind="lavt", variant="tiny", weights=trained, parent=None, annotation_count=3
    )
    engines.configure(settings)
    try:
        assert engines.get_lavt_engine("7").model_version == "lavt-tiny-base"
        store.promote("7", version.name, "test")
        assert engines.get_lavt_engine("7").model_version == version.name  # no restart
        cached = tmp_path / "c" / BUCKET / f"serve-{tmp_path.name}" / "7" / version.name / "model.safetensors"
        assert cached.read_bytes() == trained.read_bytes()  # downloaded once, into the cache
    finally:
        engines.configure(Settings())

"""The training job's model side: fine-tune the current LAVT on an exported dataset, compare on the
held-out part, store the version, promote it only when it is better; and the export it trains on."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from groundlabel.errors import UserError  # noqa: E402
from groundlabel.model_store import ModelStore  # noqa: E402
from groundlabel.settings import EngineSettings  # noqa: E402
from workers.models.lavt.config import LavtConfig  # noqa: E402
from workers.models.lavt.model import LavtNetwork  # noqa: E402
from workers.models.lavt.synthetic import make_dataset, vocabulary  # noqa: E402
from workers.models.lavt.weights import (  # noqa: E402
    read_checkpoint,
    save_checkpoint,
    save_safetensors_checkpoint,
)
from workers.training.lavt import Recipe, current_model, fine_tune_project  # noqa: E402


def tiny_base_checkpoint(path, seed: int = 0, image_size: int = 64):
    """A random tiny LAVT saved as a training checkpoint with the generated scenes' vocabulary."""
    torch.manual_seed(seed)
    net = LavtNetwork(LavtConfig(variant="tiny", image_size=image_size, device="cpu"))
    save_checkpoint(path, net, tokenizer_vocab=vocabulary())
    return path


def stored_checkpoint(checkpoint, path):
    """``checkpoint`` in the form the model store keeps (safetensors)."""
    save_safetensors_checkpoint(path, read_checkpoint(checkpoint))
    return path


def test_current_model_is_the_promoted_version_else_the_workers_checkpoint(tmp_path):
    store = ModelStore(tmp_path / "store")
    with pytest.raises(UserError, match="GROUNDLABEL_LAVT_CHECKPOINT"):
        current_model(store, "3", EngineSettings())
    base = tiny_base_checkpoint(tmp_path / "base.pth")
    engines = EngineSettings(lavt_enabled=True, lavt_checkpoint=str(base), device="cpu")
    checkpoint, parent, _ = current_model(store, "3", engines)
    assert checkpoint == str(base) and parent == "lavt-swin_b-base"  # the configured variant names it
    trained = stored_checkpoint(base, tmp_path / "trained.safetensors")
    version = store.add(
        project="3", kind="lavt", variant="tiny", weights=trained, parent=parent, annotation_count=1
    )
    assert current_model(store, "3", engines)[0] == str(base)  # stored but not promoted
    store.promote("3", version.name, "test")
    checkpoint, parent, _ = current_model(store, "3", engines)
    assert parent == version.name and checkpoint == str(store.weights_path(version))


@pytest.mark.slow
def test_fine_tuning_beats_the_base_and_is_promoted_then_a_smaller_gain_is_not(tmp_path, one_thread):
    data = make_dataset(tmp_path / "data", images=40, val_images=10, size=64, seed=5)
    base = tiny_base_checkpoint(tmp_path / "base.pth", seed=5)
    store = ModelStore(tmp_path / "store")
    engines = EngineSettings(lavt_enabled=True, lavt_checkpoint=str(base), lavt_variant="tiny", device="cpu")
    seen: list[dict] = []
    outcome = fine_tune_project(
        data,
        store=store,
        project="7",
        annotation_count=100,
        engines=engines,
        recipe=Recipe(epochs=8, batch_size=8, lr=1e-3, loader_workers=0, seed=5),
        work_dir=tmp_path / "work",
        on_progress=seen.append,
        progress_bar=False,
    )
    assert outcome.promoted and outcome.version == "lavt-tiny-p7-v1" and outcome.parent == "lavt-tiny-base"
    assert outcome.heldout_refs == 20 and outcome.train_refs == 80
    assert outcome.new["mIoU"] >= outcome.base["mIoU"] + 0.15, (outcome.base, outcome.new)
    assert store.promoted_name("7") == "lavt-tiny-p7-v1"
    record = store.get("7", "lavt-tiny-p7-v1")
    assert record.parent == "lavt-tiny-base" and record.annotation_count == 100
    assert record.metrics["new"]["oIoU"] == outcome.new["oIoU"] and len(record.metrics["epochs"]) == 8
    assert store.weights_path(record).is_file() and record.config["variant"] == "tiny"
    epochs = [s["epoch"] for s in seen if s.get("stage") == "training" and "loss" in s]
    assert epochs == list(range(1, 9))
    assert all("oIoU" in s["epoch_heldout"] for s in seen if "loss" in s)  # reported after every epoch
    # ... but never used to pick one: the new version is the last epoch.
    assert record.metrics["epochs"][-1]["val"]["oIoU"] == pytest.approx(outcome.new["oIoU"], abs=1e-6)

    # The next run starts from the promoted version; asked for a gain no model can reach (the whole
    # oIoU range), it is stored but not promoted, and the promoted version keeps serving.
    again = fine_tune_project(
        data,
        store=store,
        project="7",
        annotation_count=100,
        engines=engines,
        recipe=Recipe(epochs=1, batch_size=8, lr=1e-4, loader_workers=0, seed=5, min_gain=1.0),
        work_dir=tmp_path / "work2",
        progress_bar=False,
    )
    assert again.parent == "lavt-tiny-p7-v1" and again.version == "lavt-tiny-p7-v2"
    assert not again.promoted and "serves on" in again.reason
    assert again.base["oIoU"] == pytest.approx(outcome.new["oIoU"], abs=1e-6)  # the same held-out part
    assert store.promoted_name("7") == "lavt-tiny-p7-v1"
    assert [v.name for v in store.versions("7")] == ["lavt-tiny-p7-v1", "lavt-tiny-p7-v2"]


def test_a_dataset_without_a_held_out_part_is_refused(tmp_path):
    data = make_dataset(tmp_path / "data", images=2, val_images=0, size=32, seed=1)
    base = tiny_base_checkpoint(tmp_path / "base.pth", image_size=32)
    store = ModelStore(tmp_path / "store")
    engines = EngineSettings(lavt_enabled=True, lavt_checkpoint=str(base), device="cpu")
    with pytest.raises(UserError, match="0 held-out"):
        fine_tune_project(
            data,
            store=store,
            project="1",
            annotation_count=2,
            engines=engines,
            recipe=Recipe(epochs=1, loader_workers=0),
            work_dir=tmp_path / "work",
            progress_bar=False,
        )
    assert store.versions("1") == [] and store.promoted_name("1") is None


def test_workers_serve_the_promoted_version_per_project_without_a_restart(tmp_path):
    from groundlabel.settings import Settings
    from workers import engines

    base = tiny_base_checkpoint(tmp_path / "base.pth")
    store = ModelStore(tmp_path / "store")
    settings = Settings().with_(
        model_store=str(store.root), lavt_enabled=True, lavt_checkpoint=str(base), device="cpu"
    )
    engines.configure(settings)
    try:
        assert engines.get_lavt_engine("7").model_version == "lavt-tiny-base"  # nothing trained yet
        trained = stored_checkpoint(base, tmp_path / "trained.safetensors")
        version = store.add(
            project="7", kind="lavt", variant="tiny", weights=trained, parent=None, annotation_count=3
        )
        store.promote("7", version.name, "test")
        assert engines.lavt_enabled("7")
        assert engines.get_lavt_engine("7").model_version == "lavt-tiny-p7-v1"
        assert engines.get_lavt_engine("8").model_version == "lavt-tiny-base"  # other projects: the base
        assert engines.get_lavt_engine("7") is engines.get_lavt_engine("7")  # loaded once
        store.rollback("7")
        assert engines.get_lavt_engine("7").model_version == "lavt-tiny-base"
        without_lavt = Settings().with_(model_store=str(store.root))
        engines.configure(without_lavt)
        store.promote("7", version.name, "again")
        assert not engines.lavt_enabled("8") and engines.lavt_enabled("7")
    finally:
        engines.configure(Settings())

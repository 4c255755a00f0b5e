"""Fine-tuning a project's LAVT model on its exported referring expressions, and promoting it if better.

The dataset is a RefCOCO folder as the exporter writes it, with two splits by image: ``train`` (what the
model learns from) and ``val`` (the held-out part, never used for training nor for picking an epoch).
The current model (the project's promoted version, else the workers' ``GROUNDLABEL_LAVT_CHECKPOINT``) and
the fine-tuned one are evaluated on the same held-out sentences with LAVT's metrics (oIoU, mIoU); the new
version is stored either way, and promoted only when its held-out oIoU beats the current one's by more
than ``GROUNDLABEL_TRAIN_MIN_GAIN``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from groundlabel.errors import UserError
from groundlabel.model_store import ModelStore
from groundlabel.settings import EngineSettings, TrainingSettings

log = logging.getLogger(__name__)

#: The split names of the exported dataset: what is trained on, and the held-out part.
TRAIN_SPLIT = "train"
HELDOUT_SPLIT = "val"

Progress = Callable[[dict[str, Any]], None]


@dataclass
class Recipe:
    """How a training job fine-tunes (from ``GROUNDLABEL_TRAIN_*``)."""

    epochs: int = 10
    batch_size: int = 8
    lr: float = 5e-5
    loader_workers: int = 2
    seed: int = 0
    min_gain: float = 0.0

    @classmethod
    def from_settings(cls, training: TrainingSettings) -> Recipe:
        """The recipe the settings ask for."""
        return cls(
            epochs=training.epochs,
            batch_size=training.batch_size,
            lr=training.lr,
            loader_workers=training.loader_workers,
            seed=training.seed,
            min_gain=training.min_gain,
        )


@dataclass
class JobOutcome:
    """What a training job did: the version it stored, whether it serves now, and why, with the current
    (``base``) and the new model's held-out metrics; each kind of job adds its data counts and kind."""

    version: str
    parent: str
    promoted: bool
    reason: str
    base: dict[str, Any]
    new: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON (the job's result)."""
        return asdict(self)


@dataclass
class Outcome(JobOutcome):
    """What a fine-tuning job did (metrics: oIoU, mIoU), and how many refs it trained on and was scored on."""

    train_refs: int
    heldout_refs: int
    kind: str = "lavt"


def settle(
    store: ModelStore, project: str, name: str, parent: str, better: bool, comparison: str, min_gain: float
) -> str:
    """Promote the stored version ``name`` for ``project`` when ``better``; the reason, as logged."""
    if better:
        reason = f"promoted: {comparison}"
        store.promote(project, name, reason)
    else:
        reason = f"not promoted ({comparison}, needs a gain above {min_gain:g}): {parent} serves on"
    log.info("project %s: stored %s, %s", project, name, reason)
    return reason


def current_model(store: ModelStore, project: str, engines: EngineSettings) -> tuple[str | None, str, Any]:
    """What the project serves: ``(checkpoint, or None for random weights; its version; LavtConfig)``."""
    from workers.models.lavt.config import LavtConfig, lavt_model_version

    config = LavtConfig(**engines.lavt_options())
    promoted = store.served_trained(project)  # a promoted calibration's is the version under it
    if promoted is not None and promoted.kind == "lavt":
        return str(store.weights_path(promoted)), promoted.name, config
    if not engines.lavt_enabled:
        raise UserError(
            "there is no LAVT model to fine-tune: set GROUNDLABEL_LAVT_CHECKPOINT on the training worker "
            "(the checkpoint the prediction workers serve)"
        )
    checkpoint = engines.lavt_checkpoint
    if checkpoint is not None and not Path(checkpoint).expanduser().is_file():
        raise UserError(f"GROUNDLABEL_LAVT_CHECKPOINT={checkpoint!r} is not a file")
    return checkpoint, lavt_model_version(config.variant, checkpoint), config


def fine_tune_project(
    data_root: str | Path,
    *,
    store: ModelStore,
    project: str,
    annotation_count: int,
    engines: EngineSettings,
    recipe: Recipe,
    work_dir: str | Path,
    on_progress: Progress | None = None,
    progress_bar: bool = True,
) -> Outcome:
    """Fine-tune the project's current LAVT model on ``data_root``, store the result, promote it if better."""
    import torch

    from workers.models.device import resolve_device
    from workers.models.lavt.data import Refer, RefSegmentation
    from workers.models.lavt.factory import load_network
    from workers.models.lavt.text import load_tokenizer
    from workers.models.lavt.train import TrainOptions, evaluate, train
    from workers.models.lavt.weights import read_checkpoint, save_safetensors_checkpoint

    report = on_progress or (lambda _update: None)
    refer = Refer(data_root)
    train_refs, heldout_refs = len(refer.ref_ids(TRAIN_SPLIT)), len(refer.ref_ids(HELDOUT_SPLIT))
    if not train_refs or not heldout_refs:
        raise UserError(
            f"the project has {train_refs} training and {heldout_refs} held-out referring expressions "
            "after the split by image; both parts need at least one (annotate more images)"
        )
    checkpoint, parent, config = current_model(store, project, engines)
    log.info(
        "project %s: fine-tuning %s on %d refs, %d held out (%d annotations)",
        project,
        parent,
        train_refs,
        heldout_refs,
        annotation_count,
    )

    report({"stage": "evaluating the current model", "parent": parent})
    base_net, extras = load_network(checkpoint, config)
    net_config = base_net.config
    vocab = extras.get("tokenizer_vocab") if net_config.tokenizer is None else None
    tokenizer = load_tokenizer(net_config.tokenizer, vocab=vocab, cache_dir=net_config.cache_dir)
    device = resolve_device(net_config.device)
    heldout = RefSegmentation(
        refer, HELDOUT_SPLIT, tokenizer, image_size=net_config.image_size, max_tokens=net_config.max_tokens
    )
    base = evaluate(
        base_net.to(device),
        heldout,
        device=device,
        precision=net_config.precision,
        batch_size=recipe.batch_size,
        progress=progress_bar,
    )
    variant, architecture = net_config.variant, net_config.architecture()
    del base_net
    if device.type == "cuda":
        torch.cuda.empty_cache()
    report({"stage": "training", "epoch": 0, "epochs": recipe.epochs, "base": base})

    def epoch_done(entry: dict[str, Any]) -> None:
        epoch, epochs, loss = entry["epoch"] + 1, entry["epochs"], entry["loss"]
        heldout = {k: entry["val"][k] for k in ("oIoU", "mIoU")} if "val" in entry else {}
        log.info(
            "project %s: epoch %d/%d loss %.4f held-out oIoU %.4f",
            project,
            epoch,
            epochs,
            loss,
            heldout.get("oIoU", float("nan")),
        )
        report(
            {"stage": "training", "epoch": epoch, "epochs": epochs, "loss": loss, "epoch_heldout": heldout}
        )

    options = TrainOptions(
        data_root=str(data_root),
        train_split=TRAIN_SPLIT,
        val_split=HELDOUT_SPLIT,  # reported after every epoch, never used to pick one (pick_best=False):
        pick_best=False,  # the last epoch is the new version, so the comparison stays fair
        eval_splits=[HELDOUT_SPLIT],
        output=str(Path(work_dir) / "run"),
        epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        eval_batch_size=recipe.batch_size,
        lr=recipe.lr,
        workers=recipe.loader_workers,
        init=checkpoint,
        bert="none" if checkpoint else "auto",
        seed=recipe.seed,
        model=config,
    )
    result = train(options, progress=progress_bar, on_epoch=epoch_done)
    new = result["final"][HELDOUT_SPLIT]
    better = new["oIoU"] > base["oIoU"] + recipe.min_gain
    weights = Path(work_dir) / "model.safetensors"  # the store keeps safetensors, never a pickle
    save_safetensors_checkpoint(weights, read_checkpoint(result["checkpoint"]))
    version = store.add(
        project=project,
        kind="lavt",
        variant=variant,
        weights=weights,
        parent=parent,
        annotation_count=annotation_count,
        config=architecture,
        metrics={
            "base": base,
            "new": new,
            "epochs": result["epochs"],
            "train_refs": train_refs,
            "heldout_refs": heldout_refs,
            "recipe": asdict(recipe),
        },
    )
    comparison = f"held-out oIoU {new['oIoU']:.4f} vs {base['oIoU']:.4f} for {parent}"
    reason = settle(store, project, version.name, parent, better, comparison, recipe.min_gain)
    return Outcome(version.name, parent, better, reason, base, new, train_refs, heldout_refs)

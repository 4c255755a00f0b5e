"""Fine-tuning and evaluating LAVT on a RefCOCO-format dataset, following the official recipe.

Loss: 2-class cross-entropy with class weights [0.9, 1.1]. Optimiser: AdamW (lr 5e-5, weight decay
1e-2), no decay on the backbone's norms and relative position tables; the decoder and BERT encoder
layers 0-9 are trained, BERT's embeddings and last two layers are not. Schedule: ``(1 - it/total)^0.9``
per iteration. No augmentation (480×480 resize). bf16 autocast on CUDA.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from groundlabel.errors import UserError
from workers.models.device import autocast_context, resolve_device
from workers.models.lavt.config import LavtConfig
from workers.models.lavt.data import Refer, RefSegmentation, iou_stats, summarize
from workers.models.lavt.factory import RUNTIME_FIELDS
from workers.models.lavt.model import LavtNetwork
from workers.models.lavt.text import load_tokenizer, tokenizer_vocab
from workers.models.lavt.weights import (
    load_network_state,
    load_pretrained_bert,
    load_swin_imagenet,
    read_checkpoint,
    save_checkpoint,
    split_checkpoint,
)

log = logging.getLogger(__name__)

CLASS_WEIGHTS = (0.9, 1.1)
LAST_CHECKPOINT = "checkpoint_last.pth"
BEST_CHECKPOINT = "model_best.pth"


@dataclass
class TrainOptions:
    """Everything ``groundlabel train-lavt`` accepts."""

    data_root: str
    dataset: str = "refcoco"
    split_by: str = "unc"
    train_split: str = "train"
    val_split: str | None = "val"  # evaluated after every epoch; picks model_best.pth by oIoU
    eval_splits: list[str] | None = None  # evaluated at the end; None: every split but the training one
    output: str = "runs/lavt"
    epochs: int = 40
    batch_size: int = 8
    eval_batch_size: int = 8
    lr: float = 5e-5
    weight_decay: float = 1e-2
    workers: int = 2
    init: str | None = None  # an official LAVT checkpoint or one of ours
    swin_init: str | None = None  # ImageNet Swin weights (e.g. swin_base_patch4_window12_384_22k.pth)
    bert: str | None = "auto"  # BERT weights: hub name / folder; "auto": bert-base-uncased if shapes fit
    resume: str | None = None
    seed: int = 0
    mask_rule: str = "lavt"
    limit_refs: int | None = None  # use only the first N training refs (quick trials)
    pick_best: bool = True  # model_best.pth: the best val epoch; False: the last epoch (val is only reported)
    model: LavtConfig = field(default_factory=LavtConfig)


def parameter_groups(net: LavtNetwork, weight_decay: float) -> list[dict[str, Any]]:
    """The official optimiser groups; BERT parameters outside layers 0..bert_train_layers-1 are frozen."""
    backbone_no_decay, backbone_decay = [], []
    for name, p in net.model.backbone.named_parameters():
        if any(tag in name for tag in ("norm", "absolute_pos_embed", "relative_position_bias_table")):
            backbone_no_decay.append(p)
        else:
            backbone_decay.append(p)
    bert = net.bert_model
    trained = min(net.config.bert_train_layers, len(bert.encoder.layer))
    for p in bert.parameters():
        p.requires_grad_(False)
    bert_params = []
    for i in range(trained):
        for p in bert.encoder.layer[i].parameters():
            p.requires_grad_(True)
            bert_params.append(p)
    groups = [
        {"params": backbone_no_decay, "weight_decay": 0.0},
        {"params": backbone_decay, "weight_decay": weight_decay},
        {"params": list(net.model.classifier.parameters()), "weight_decay": weight_decay},
    ]
    if bert_params:
        groups.append({"params": bert_params, "weight_decay": weight_decay})
    return groups


def poly_lambda(total: int):
    """``(1 - it/total)^0.9``, the official per-iteration schedule."""
    return lambda it: max(0.0, 1.0 - it / max(1, total)) ** 0.9


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Weighted 2-class cross-entropy at the input resolution."""
    weight = torch.tensor(CLASS_WEIGHTS, device=logits.device, dtype=torch.float32)
    return F.cross_entropy(logits.float(), target, weight=weight)


@torch.inference_mode()
def evaluate(
    net: LavtNetwork,
    dataset: RefSegmentation,
    *,
    device: torch.device,
    precision: str = "auto",
    batch_size: int = 8,
    workers: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """LAVT's evaluation: every sentence, argmax at image_size², IoU against the resized ground truth."""
    from tqdm import tqdm

    was_training = net.training
    net.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    inter: list[float] = []
    union: list[float] = []
    for image, target, ids, mask in tqdm(
        loader, desc=f"eval {dataset.split}", disable=not progress, leave=False
    ):
        with autocast_context(device, precision):
            logits = net(image.to(device), ids.to(device), mask.to(device))
        i, u = iou_stats(logits.argmax(1).cpu(), target)
        inter += i
        union += u
    net.train(was_training)
    return summarize(inter, union)


def format_metrics(split: str, metrics: dict[str, float]) -> str:
    """One table row: split, samples, oIoU, mIoU, P@0.5..0.9 (percent)."""
    cells = [f"{split:<8}", f"{int(metrics['samples']):>7}"]
    keys = ("oIoU", "mIoU", "P@0.5", "P@0.6", "P@0.7", "P@0.8", "P@0.9")
    cells += [f"{100 * metrics[k]:6.2f}" for k in keys]
    return " | ".join(cells)


METRICS_HEADER = "split    | samples |   oIoU |   mIoU |  P@0.5 |  P@0.6 |  P@0.7 |  P@0.8 |  P@0.9"


def _build(options: TrainOptions) -> tuple[LavtNetwork, Any, dict[str, Any]]:
    """Network and tokenizer from the options: --resume, else --init, else --swin-init / --bert / random."""
    source = options.resume or options.init
    extras: dict[str, Any] = {}
    config = options.model
    model_state = bert_state = None
    if source:
        model_state, bert_state, extras = split_checkpoint(read_checkpoint(source))
        if isinstance(extras.get("config"), dict):
            runtime = {k: getattr(config, k) for k in RUNTIME_FIELDS}
            config = LavtConfig.from_dict(extras["config"], **runtime)
    net = LavtNetwork(config)
    if model_state is not None:
        load_network_state(net, model_state, bert_state, require_bert=False)
    elif options.swin_init:
        load_swin_imagenet(net.model.backbone, options.swin_init)
    if bert_state is None:
        bert = options.bert
        if bert == "auto":
            bert = "bert-base-uncased" if config.bert_config in (None, {}) else None
        if bert and bert.lower() != "none":
            load_pretrained_bert(net.bert_model, bert, cache_dir=config.cache_dir)
        else:
            log.warning("the text encoder starts from random weights (no --bert weights)")
    vocab = extras.get("tokenizer_vocab") if config.tokenizer is None else None
    tokenizer = load_tokenizer(config.tokenizer, vocab=vocab, cache_dir=config.cache_dir)
    if len(tokenizer.get_vocab()) > net.bert_model.config.vocab_size:
        raise UserError(
            f"the tokenizer has {len(tokenizer.get_vocab())} tokens, more than BERT's "
            f"{net.bert_model.config.vocab_size}: give the matching --tokenizer"
        )
    return net, tokenizer, extras


def train(
    options: TrainOptions,
    *,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the training; returns ``{"epochs": [...per-epoch val metrics], "final": {split: metrics}}``.

    ``on_epoch`` is called after every epoch with that epoch's entry (``epoch``, ``epochs``, ``loss``,
    ``seconds``, and ``val`` when a validation split is evaluated).
    """
    from tqdm import tqdm

    random.seed(options.seed)
    torch.manual_seed(options.seed)
    out_dir = Path(options.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    refer = Refer(options.data_root, options.dataset, options.split_by)
    net, tokenizer, extras = _build(options)
    config = net.config
    device = resolve_device(config.device)
    net.to(device)
    train_set = RefSegmentation(
        refer,
        options.train_split,
        tokenizer,
        image_size=config.image_size,
        max_tokens=config.max_tokens,
        train=True,
        mask_rule=options.mask_rule,
        limit=options.limit_refs,
    )
    val_set = None
    if options.val_split and refer.ref_ids(options.val_split):
        val_set = RefSegmentation(
            refer,
            options.val_split,
            tokenizer,
            image_size=config.image_size,
            max_tokens=config.max_tokens,
            mask_rule=options.mask_rule,
        )
    loader = DataLoader(
        train_set,
        batch_size=options.batch_size,
        shuffle=True,
        num_workers=options.workers,
        drop_last=len(train_set) > options.batch_size,
        pin_memory=device.type == "cuda",
        persistent_workers=options.workers > 0,
    )
    groups = parameter_groups(net, options.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=options.lr, weight_decay=options.weight_decay)
    total = len(loader) * options.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lambda(total))
    start_epoch, best = 0, -1.0
    history: list[dict[str, Any]] = []
    if options.resume:
        state = read_checkpoint(options.resume)
        if "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
        if "lr_scheduler" in state:
            scheduler.load_state_dict(state["lr_scheduler"])
        start_epoch = int(state.get("epoch", -1)) + 1
        best = float(state.get("best_oiou", -1.0))
        history = list(state.get("history", []))
        log.info("resuming after epoch %d from %s", start_epoch - 1, options.resume)
    vocab = tokenizer_vocab(tokenizer)
    record = {k: v for k, v in asdict(options).items() if k != "model"}
    for epoch in range(start_epoch, options.epochs):
        net.train()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{options.epochs}", disable=not progress)
        losses: list[float] = []
        started = time.perf_counter()
        for image, target, ids, mask in bar:
            image, target = image.to(device, non_blocking=True), target.to(device, non_blocking=True)
            ids, mask = ids.to(device), mask.to(device)
            with autocast_context(device, config.precision):
                logits = net(image, ids, mask)
            loss = segmentation_loss(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        entry: dict[str, Any] = {
            "epoch": epoch,
            "loss": sum(losses) / max(1, len(losses)),
            "seconds": time.perf_counter() - started,
        }
        if val_set is not None:
            metrics = evaluate(
                net,
                val_set,
                device=device,
                precision=config.precision,
                batch_size=options.eval_batch_size,
                progress=progress,
            )
            entry["val"] = metrics
            print(
                f"epoch {epoch + 1}: loss {entry['loss']:.4f}\n{METRICS_HEADER}\n"
                f"{format_metrics(options.val_split, metrics)}",
                flush=True,
            )
            improved = metrics["oIoU"] > best
            best = max(best, metrics["oIoU"])
            if improved and options.pick_best:
                save_checkpoint(
                    out_dir / BEST_CHECKPOINT,
                    net,
                    tokenizer_vocab=vocab,
                    epoch=epoch,
                    metrics=metrics,
                    options=record,
                )
        else:
            print(f"epoch {epoch + 1}: loss {entry['loss']:.4f}", flush=True)
        history.append(entry)
        if on_epoch is not None:
            on_epoch({**entry, "epochs": options.epochs})
        save_checkpoint(
            out_dir / LAST_CHECKPOINT,
            net,
            tokenizer_vocab=vocab,
            epoch=epoch,
            best_oiou=best,
            optimizer=optimizer.state_dict(),
            lr_scheduler=scheduler.state_dict(),
            history=history,
            options=record,
        )
    if val_set is None or not options.pick_best or not (out_dir / BEST_CHECKPOINT).exists():
        save_checkpoint(
            out_dir / BEST_CHECKPOINT, net, tokenizer_vocab=vocab, epoch=options.epochs - 1, options=record
        )
    splits = options.eval_splits or [s for s in refer.splits() if s != options.train_split]
    final: dict[str, dict[str, float]] = {}
    for split in splits:
        dataset = RefSegmentation(
            refer,
            split,
            tokenizer,
            image_size=config.image_size,
            max_tokens=config.max_tokens,
            mask_rule=options.mask_rule,
        )
        final[split] = evaluate(
            net,
            dataset,
            device=device,
            precision=config.precision,
            batch_size=options.eval_batch_size,
            progress=progress,
        )
    if final:
        rows = "\n".join(format_metrics(s, m) for s, m in final.items())
        print(f"final model:\n{METRICS_HEADER}\n{rows}")
    result = {"epochs": history, "final": final, "checkpoint": str(out_dir / BEST_CHECKPOINT)}
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    return result

"""``groundlabel train-lavt`` and ``groundlabel eval-lavt`` (torch is imported inside the handlers)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from groundlabel.errors import UserError


def _model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--variant",
        default="swin_b",
        choices=["swin_b", "swin_t", "tiny"],
        help="backbone size (published checkpoints: swin_b)",
    )
    group.add_argument(
        "--window-size",
        type=int,
        default=None,
        help="Swin window (12 for the published checkpoints and Swin-B 384/22k init)",
    )
    group.add_argument("--image-size", type=int, default=480, help="square input size (LAVT: 480)")
    group.add_argument(
        "--tokenizer",
        default=None,
        help="BERT vocab.txt or folder (default: the checkpoint's own vocabulary, "
        "else bert-base-uncased from the Hugging Face cache)",
    )
    group.add_argument("--device", default="auto", help="cuda, cuda:1, cpu or auto")
    group.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="auto: bf16 autocast on CUDA, fp32 on CPU",
    )
    group.add_argument(
        "--dataset", default="refcoco", help="sub-folder of DATASET: refcoco, refcoco+, refcocog"
    )
    group.add_argument("--split-by", default="unc", help="refs(<split-by>).p to read (unc, google, umd)")
    group.add_argument(
        "--mask-union",
        action="store_true",
        help="count pixels where an object's polygons overlap as foreground "
        "(LAVT drops them: its targets keep part-count == 1)",
    )
    group.add_argument("--workers", type=int, default=2, help="data-loading processes")


def _config(args: argparse.Namespace):
    from workers.models.lavt.config import LavtConfig

    return LavtConfig(
        variant=args.variant,
        window_size=args.window_size,
        image_size=args.image_size,
        tokenizer=args.tokenizer,
        device=args.device,
        precision=args.precision,
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train-lavt`` and ``eval-lavt`` verbs."""
    train = subparsers.add_parser(
        "train-lavt",
        help="fine-tune LAVT on a RefCOCO-format dataset",
        description="Fine-tune LAVT (official recipe: weighted CE, AdamW 5e-5, poly LR) on a RefCOCO-format "
        "folder as `groundlabel export --format refcoco` writes it. Writes checkpoint_last.pth every "
        "epoch and model_best.pth (best val oIoU), which the workers load.",
    )
    train.add_argument("data_root", metavar="DATASET", help="RefCOCO-format root folder")
    _model_options(train)
    group = train.add_argument_group("training")
    group.add_argument("--output", default="runs/lavt", help="folder for checkpoints and metrics.json")
    group.add_argument("--epochs", type=int, default=40)
    group.add_argument("--batch-size", type=int, default=8)
    group.add_argument("--eval-batch-size", type=int, default=8)
    group.add_argument("--lr", type=float, default=5e-5)
    group.add_argument("--weight-decay", type=float, default=1e-2)
    group.add_argument("--init", default=None, help="start from a LAVT checkpoint (official or ours)")
    group.add_argument(
        "--swin-init", default=None, help="ImageNet Swin weights, e.g. swin_base_patch4_window12_384_22k.pth"
    )
    group.add_argument(
        "--bert",
        default="auto",
        help="BERT weights (hub name in the cache or folder); 'none' for random; "
        "auto: bert-base-uncased for swin_b/swin_t",
    )
    group.add_argument("--resume", default=None, help="continue from a checkpoint_last.pth")
    group.add_argument("--train-split", default="train")
    group.add_argument("--val-split", default="val", help="evaluated after every epoch ('' for none)")
    group.add_argument(
        "--eval-splits",
        default=None,
        help="comma-separated splits evaluated at the end (default: all but the training one)",
    )
    group.add_argument("--limit-refs", type=int, default=None, help="use only the first N training refs")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(handler=run_train)

    evaluate = subparsers.add_parser(
        "eval-lavt",
        help="evaluate a LAVT checkpoint on a RefCOCO-format dataset",
        description="LAVT's evaluation: every sentence, argmax at 480x480 against the resized ground truth; "
        "prints oIoU, mIoU and precision@0.5..0.9 per split.",
    )
    evaluate.add_argument("data_root", metavar="DATASET", help="RefCOCO-format root folder")
    evaluate.add_argument("--checkpoint", required=True, help="LAVT checkpoint (official or ours)")
    evaluate.add_argument("--split", default="val", help="comma-separated splits, e.g. val,testA,testB")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bars")
    _model_options(evaluate)
    evaluate.set_defaults(handler=run_eval)


def run_train(args: argparse.Namespace) -> int:
    """Handler of ``train-lavt``."""
    from workers.models.lavt.train import TrainOptions, train

    if args.epochs < 1 or args.batch_size < 1:
        raise UserError("--epochs and --batch-size must be at least 1")
    options = TrainOptions(
        data_root=args.data_root,
        dataset=args.dataset,
        split_by=args.split_by,
        train_split=args.train_split,
        val_split=args.val_split or None,
        eval_splits=[s for s in args.eval_splits.split(",") if s] if args.eval_splits else None,
        output=args.output,
        epochs=args.epochs,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        workers=args.workers,
        init=args.init,
        swin_init=args.swin_init,
        bert=args.bert,
        resume=args.resume,
        seed=args.seed,
        mask_rule="union" if args.mask_union else "lavt",
        limit_refs=args.limit_refs,
        model=_config(args),
    )
    result = train(options, progress=not args.no_progress)
    print(f"checkpoint: {result['checkpoint']}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """Handler of ``eval-lavt``."""
    from workers.models.device import resolve_device
    from workers.models.lavt.data import Refer, RefSegmentation
    from workers.models.lavt.factory import load_network
    from workers.models.lavt.text import load_tokenizer
    from workers.models.lavt.train import METRICS_HEADER, evaluate, format_metrics

    refer = Refer(args.data_root, args.dataset, args.split_by)
    net, extras = load_network(args.checkpoint, _config(args))
    config = net.config
    vocab = extras.get("tokenizer_vocab") if config.tokenizer is None else None
    tokenizer = load_tokenizer(config.tokenizer, vocab=vocab, cache_dir=config.cache_dir)
    device = resolve_device(config.device)
    net.to(device)
    results = {}
    for split in [s for s in args.split.split(",") if s]:
        dataset = RefSegmentation(
            refer,
            split,
            tokenizer,
            image_size=config.image_size,
            max_tokens=config.max_tokens,
            mask_rule="union" if args.mask_union else "lavt",
        )
        results[split] = evaluate(
            net,
            dataset,
            device=device,
            precision=config.precision,
            batch_size=args.batch_size,
            workers=args.workers,
            progress=not args.no_progress,
        )
    print(METRICS_HEADER)
    for split, metrics in results.items():
        print(format_metrics(split, metrics))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0

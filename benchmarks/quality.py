"""Grounding quality on held-out generated scenes: GEM vs MaskCLIP vs CLIP's own patch tokens.

Uses the tiny CLIP kept at tests/assets/tiny_clip.pt (trained on captions only, never on masks).
GEM runs twice: with its adaptive temperature, and with the inverse temperature chosen on validation
scenes (their own seed; the sweep is printed first). Prints the method × mIoU table and per-class IoU,
and writes benchmarks/results/quality.json.

    .venv/bin/python benchmarks/quality.py                 # 300 scenes, object colours as the classes
    .venv/bin/python benchmarks/quality.py --scenes 100 --quick
    .venv/bin/python benchmarks/quality.py --target shape  # shapes as the classes
    .venv/bin/python benchmarks/quality.py --methods --distill-steps 300 --scenes 150
    .venv/bin/python benchmarks/quality.py --sam             # GEM, +PAMR, +tiny SAM; clicks → SAM vs GEM
    .venv/bin/python benchmarks/quality.py --sam-tune        # refine=sam's rule on the tuning scenes
    .venv/bin/python benchmarks/quality.py --quick --precision fp32 bf16   # bf16 against fp32 (CPU)
    .venv/bin/python benchmarks/quality.py --sam --precision fp32 bf16

``--precision`` (default fp32) runs the evaluated engines in each precision named (``auto``: as
``GROUNDLABEL_CPU_PRECISION=auto`` on this CPU); GEM's temperature is chosen in fp32 either way. With
several, a last table gives every score in each and its difference to the first.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_result  # noqa: E402
from workers.evaluation.quality import (  # noqa: E402
    adaptive_inverse_temperatures,
    evaluate_tiny_clip,
    format_results,
    select_gem_temperature,
)
from workers.evaluation.tiny_clip import load_tiny_clip  # noqa: E402
from workers.models.gem.config import METHODS  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", default=str(ROOT / "tests" / "assets" / "tiny_clip.pt"))
    parser.add_argument("--scenes", type=int, default=300)
    parser.add_argument("--bg-threshold", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="only the three methods, no depth/size variants")
    parser.add_argument(
        "--target",
        choices=("shape", "colour"),
        default="colour",
        help="what the classes are (default colour: the tiny CLIP knows colours, not shapes)",
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality.json"))
    parser.add_argument(
        "--methods",
        action="store_true",
        help="every training-free method (docs/methods.md), each with and without PAMR",
    )
    parser.add_argument(
        "--distill-steps",
        type=int,
        default=0,
        help="also distil the tiny CLIP (CLIPSelf) on training scenes for N steps and "
        "evaluate the distilled model",
    )
    parser.add_argument(
        "--sam",
        action="store_true",
        help="refine=sam and clicks with the tiny SAM (tests/assets/tiny_sam.pt): mIoU and boundary F",
    )
    parser.add_argument(
        "--sam-tune",
        action="store_true",
        help="refine=sam's min_iou × min_score on the tuning scenes (never the held-out ones)",
    )
    parser.add_argument("--sam-checkpoint", default=str(ROOT / "tests" / "assets" / "tiny_sam.pt"))
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=("fp32", "bf16", "auto"),
        default=["fp32"],
        help="the CPU arithmetic of the evaluated engines, one run each (default fp32)",
    )
    args = parser.parse_args()

    if args.sam_tune:
        return sam_tune_table(args)
    if args.sam:
        return sam_table(args)
    if args.methods or args.distill_steps:
        return methods_table(args)
    _, _, cfg = load_tiny_clip(args.checkpoint)
    size, layers = cfg.image_size, cfg.vision_layers
    depth = min(7, layers + 1)
    temps = adaptive_inverse_temperatures(args.checkpoint)
    print("GEM's adaptive inverse temperature per block: " + ", ".join(f"{t:.2f}" for t in temps))
    temp, sweep = select_gem_temperature(
        args.checkpoint, scenes=min(args.scenes, 150), target=args.target, threads=args.threads
    )
    print(f"validation scenes ({min(args.scenes, 150)}, own seed): GEM inverse temperature sweep")
    print(format_results(sweep, args.bg_threshold).split("\n\n")[0])
    print(f"chosen: {'adaptive' if temp is None else temp}\n")
    tuned = f"gem d{depth} temp{temp:g}" if temp is not None else None
    variants = [
        (f"gem d{depth}", {"method": "gem", "gem_depth": depth}),
        *([(tuned, {"method": "gem", "gem_depth": depth, "ss_attn_temp": temp})] if tuned else []),
        ("maskclip", {"method": "maskclip"}),
        ("original", {"method": "original"}),
        ("clip_surgery", {"method": "clip_surgery", "gem_depth": depth}),
    ]
    if not args.quick:
        # GEM's depth, input size and iteration variants, at the validated temperature when one was chosen
        t_opt = {} if temp is None else {"ss_attn_temp": temp}
        t_name = "" if temp is None else f" temp{temp:g}"
        gem = {"method": "gem", "gem_depth": depth, **t_opt}
        variants += [(f"gem d{d}{t_name}", {**gem, "gem_depth": d}) for d in (3, 5) if d <= layers + 1]
        variants += [
            (f"gem d{depth}{t_name} {2 * size}px", {**gem, "image_size": 2 * size}),
            (f"maskclip {2 * size}px", {"method": "maskclip", "image_size": 2 * size}),
            (f"original {2 * size}px", {"method": "original", "image_size": 2 * size}),
            (f"gem d{depth}{t_name} iter2", {**gem, "ss_attn_iter": 2}),
        ]
    runs = {}
    for precision in args.precision:
        start = time.perf_counter()
        runs[precision] = evaluate_tiny_clip(
            args.checkpoint,
            scenes=args.scenes,
            variants=variants,
            bg_threshold=args.bg_threshold,
            threads=args.threads,
            target=args.target,
            cpu_precision=precision,
        )
        print(
            f"tiny CLIP {Path(args.checkpoint).name}: {layers} blocks, width {cfg.vision_width}, "
            f"{size}px input, patch {cfg.patch_size}; {args.scenes} held-out scenes; classes: "
            f"{args.target}s; precision {precision}"
        )
        print(format_results(runs[precision], args.bg_threshold))
        print(f"total {time.perf_counter() - start:.1f} s")
    results = runs[args.precision[0]]
    metrics = ("fg_mIoU", "bg_mIoU", "bg_best_mIoU")
    by_precision = {p: [r.row() for r in rs] for p, rs in runs.items()}
    if len(runs) > 1:
        print(precision_table(by_precision, metrics))
    out = write_result(
        args.out,
        {
            "checkpoint": Path(args.checkpoint).name,
            "target": args.target,
            "scenes": args.scenes,
            "bg_threshold": args.bg_threshold,
            "adaptive_inverse_temperatures": temps,
            "validated_inverse_temperature": temp,
            "validation_sweep": [r.row() for r in sweep],
            "precision": args.precision[0],
            "results": [r.row() for r in results],
            "results_by_precision": by_precision,
        },
    )
    print(f"wrote {out}")
    return 0


def methods_table(args: argparse.Namespace) -> int:
    """Each method with and without PAMR (full-size PAMR: the scenes are only 48 px), optionally also on a
    CLIPSelf-distilled copy of the tiny CLIP."""
    import torch

    _, _, cfg = load_tiny_clip(args.checkpoint)
    depth = min(7, cfg.vision_layers + 1)
    variants = []
    for m in METHODS:
        base = {"method": m, "gem_depth": depth}
        variants.append((m, base))
        variants.append((f"{m} +pamr", {**base, "refine": "pamr", "pamr_scale": 1.0}))
    checkpoints = [("base", args.checkpoint)]
    if args.distill_steps:
        from workers.evaluation.scenes import make_scenes
        from workers.evaluation.tiny_clip import save_tiny_clip
        from workers.models.clipself.distill import DistillConfig, distill

        torch.set_num_threads(args.threads)
        model, tokenizer, tcfg = load_tiny_clip(args.checkpoint)
        train = [s.image for s in make_scenes(400, seed=12345, size=tcfg.image_size)]
        dcfg = DistillConfig(
            steps=args.distill_steps,
            lr=1e-4,
            batch_size=8,
            image_size=2 * tcfg.image_size,
            crop_size=tcfg.image_size,
            max_split=3,
            warmup=20,
            ensemble_alpha=0.7,
        )
        start = time.perf_counter()
        _, losses = distill(model, train, len(train), dcfg, progress=False)
        print(
            f"distilled {args.distill_steps} steps in {time.perf_counter() - start:.0f} s: "
            f"loss {sum(losses[:10]) / 10:.4f} -> {sum(losses[-10:]) / 10:.4f}"
        )
        path = Path(args.out).with_name("tiny_clip_distilled.pt")
        save_tiny_clip(path, model, tokenizer, tcfg)
        checkpoints.append(("distilled", str(path)))
    rows = []
    for label, ckpt in checkpoints:
        temp, _ = select_gem_temperature(
            ckpt, scenes=min(args.scenes, 150), target=args.target, threads=args.threads
        )
        extra = []
        if temp is not None:
            tuned = {"method": "gem", "gem_depth": depth, "ss_attn_temp": temp}
            extra = [
                (f"gem temp{temp:g}", tuned),
                (f"gem temp{temp:g} +pamr", {**tuned, "refine": "pamr", "pamr_scale": 1.0}),
            ]
        results = evaluate_tiny_clip(
            ckpt,
            scenes=args.scenes,
            variants=variants[:2] + extra + variants[2:],
            bg_threshold=args.bg_threshold,
            threads=args.threads,
            target=args.target,
        )
        print(
            f"== {label} tiny CLIP ({Path(ckpt).name}), {args.scenes} held-out scenes, "
            f"classes: {args.target}s"
        )
        print(format_results(results, args.bg_threshold))
        rows += [{"model": label, **r.row()} for r in results]
    out = Path(args.out).with_name("quality_methods.json")
    write_result(out, {"scenes": args.scenes, "target": args.target, "results": rows})
    print(f"wrote {out}")
    return 0


def sam_table(args: argparse.Namespace) -> int:
    """GEM, GEM + PAMR, GEM + tiny SAM (and + PAMR + SAM), and a click at each object's centre → tiny SAM
    vs → GEM's component, on the held-out scenes; GEM's temperature is chosen on validation scenes."""
    import torch

    from workers.evaluation.sam_quality import evaluate_clicks, evaluate_refinement, format_rows

    torch.set_num_threads(args.threads)
    temp, _ = select_gem_temperature(args.checkpoint, scenes=min(args.scenes, 150), target="colour")
    runs = {}
    for precision in args.precision:
        start = time.perf_counter()
        options = {"scenes": args.scenes, "temperature": temp, "cpu_precision": precision}
        rows = evaluate_refinement(args.checkpoint, args.sam_checkpoint, **options)
        clicks = evaluate_clicks(args.checkpoint, args.sam_checkpoint, **options)
        print(
            f"{args.scenes} held-out scenes, classes: colours; GEM inverse temperature "
            f"{'adaptive' if temp is None else temp} (validated); tiny SAM {Path(args.sam_checkpoint).name}; "
            f"precision {precision}"
        )
        print(format_rows(rows))
        print()
        print(format_rows(clicks).replace("mIoU ", "IoU  "))
        print(f"total {time.perf_counter() - start:.1f} s")
        runs[precision] = ([r.as_dict() for r in rows], [r.as_dict() for r in clicks])
    if len(runs) > 1:
        both = {p: [*maps, *clicks] for p, (maps, clicks) in runs.items()}
        print(precision_table(both, ("mIoU", "boundary_F")))
    first = runs[args.precision[0]]
    out = write_result(
        Path(args.out).with_name("quality_sam.json"),
        {
            "scenes": args.scenes,
            "gem_inverse_temperature": temp,
            "sam_checkpoint": Path(args.sam_checkpoint).name,
            "precision": args.precision[0],
            "label_maps": first[0],
            "clicks": first[1],
            "by_precision": {p: {"label_maps": m, "clicks": c} for p, (m, c) in runs.items()},
        },
    )
    print(f"wrote {out}")
    return 0


def precision_table(runs: dict[str, list[dict]], metrics: tuple[str, ...]) -> str:
    """Each method's ``metrics`` in every precision of ``runs`` (precision → rows with a ``method`` key, in
    the same order) and the difference of each to the first precision, in points."""
    names = list(runs)
    first = runs[names[0]]
    w = max(len("method"), *(len(r["method"]) for r in first))
    head = f"{'method':<{w}} | {'score':<12} | " + " | ".join(f"{p:>6}" for p in names)
    head += "".join(f" | {p + ' - ' + names[0]:>14}" for p in names[1:])
    lines = [head, "-" * len(head)]
    for i, row in enumerate(first):
        for m in metrics:
            values = [runs[p][i][m] for p in names]
            line = f"{row['method']:<{w}} | {m:<12} | " + " | ".join(f"{v:6.2f}" for v in values)
            line += "".join(f" | {v - values[0]:+14.2f}" for v in values[1:])
            lines.append(line)
    return "\n".join(lines)


def sam_tune_table(args: argparse.Namespace) -> int:
    """The ``+sam`` rows for every ``min_iou`` × ``min_score`` on the tuning scenes (``--scenes``, at most
    150); GEM's temperature and every row's threshold are chosen on validation scenes as in ``--sam``."""
    import torch

    from workers.evaluation.sam_quality import TUNING_SEED, tune_refinement

    torch.set_num_threads(args.threads)
    temp, _ = select_gem_temperature(args.checkpoint, scenes=min(args.scenes, 150), target="colour")
    n = min(args.scenes, 150)
    rows = tune_refinement(args.checkpoint, args.sam_checkpoint, scenes=n, temperature=temp)
    print(f"tuning scenes (seed {TUNING_SEED}); GEM inverse temperature {temp}")
    print(f"{'method':<16} | min_iou | min_score | mIoU  | boundary F | threshold")
    seen = set()
    for r in rows:
        key = (r["method"], r["threshold"]) if "+sam" not in r["method"] else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        print(f"{r['method']:<16} | {r['min_iou']:7.2f} | {r['min_score']:9.2f} | {r['mIoU']:5.2f} | "
              f"{r['boundary_F']:10.2f} | {r['threshold']}")  # fmt: skip
    out = Path(args.out).with_name("quality_sam_tuning.json")
    write_result(out, {"seed": TUNING_SEED, "gem_inverse_temperature": temp, "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

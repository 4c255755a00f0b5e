"""Promptable SAM speed per family: first click, next click, and the image embedding's cost.

Random weights at the published architectures' sizes (SAM ViT-B, SAM-HQ ViT-B, SAM 2.1 Hiera-T, EdgeTAM,
the SAM 3 tracker), on one photo-sized image. The first click on an image computes its embedding (and
keeps it in the engine's cache); the next clicks on the same image run only the prompt encoder and the
mask decoder. Prints a table and writes benchmarks/results/sam_speed.json; exits 1 when a next click
costs half an image embedding or more (the cached embedding was not reused).

    .venv/bin/python benchmarks/sam_speed.py                          # every family, CPU
    .venv/bin/python benchmarks/sam_speed.py --families sam2 edgetam --clicks 5
    .venv/bin/python benchmarks/sam_speed.py --device cuda            # the same on a GPU
    .venv/bin/python benchmarks/sam_speed.py --families sam2 edgetam --precision fp32 bf16

``--precision`` (default fp32): the image encoder's arithmetic on a CPU (``GROUNDLABEL_CPU_PRECISION``;
``auto``: bf16 where the CPU multiplies bf16 natively, AVX512-BF16 or AMX), each family measured in each
one named; with several, the first click's and the embedding's speed-up over the first precision.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.common import write_result  # noqa: E402
from workers.models.sam import FAMILIES, Prompt, SamConfig, SamEngine, family, real_config  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(
    name: str, image: Image.Image, clicks: int, device: str, warmup: bool = True, precision: str = "fp32"
) -> dict:
    """Timings of one family (seconds) with its image encoder in ``precision`` on a CPU, its parameter
    count and its embedding's size."""
    torch.manual_seed(0)
    start = time.perf_counter()
    model = family(name).model_cls()(real_config(name))
    build = time.perf_counter() - start
    config = SamConfig(model=None, family=name, device=device, cpu_precision=precision)
    engine = SamEngine(config, model=model)
    rng = np.random.default_rng(0)
    points = [(float(x), float(y)) for x, y in rng.uniform(0, [image.width, image.height], (clicks + 1, 2))]
    if warmup:  # on another image (allocations, kernels)
        engine.segment(image.transpose(Image.FLIP_LEFT_RIGHT), [Prompt([points[0]], [1])])
    engine.cache.clear()
    sync(engine.device)
    start = time.perf_counter()
    engine.segment(image, [Prompt([points[0]], [1])])
    sync(engine.device)
    first = time.perf_counter() - start
    nexts = []
    for p in points[1:]:
        start = time.perf_counter()
        engine.segment(image, [Prompt([p], [1])])
        sync(engine.device)
        nexts.append(time.perf_counter() - start)
    engine.cache.clear()
    start = time.perf_counter()
    emb = engine.embed(image)
    sync(engine.device)
    embed = time.perf_counter() - start
    assert engine.cache.hits == 0
    return {
        "family": name,
        "precision": engine.precision,
        "parameters_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "input": engine.input_size,
        "first_click_s": first,
        "next_click_s": statistics.median(nexts),
        "embedding_s": embed,
        "ratio": statistics.median(nexts) / first,
        "embedding_MiB": emb.nbytes / 2**20,
        "build_s": build,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--clicks", type=int, default=5, help="next clicks per family (median reported)")
    parser.add_argument("--size", default="1024x768", help="image WIDTHxHEIGHT")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=("fp32", "bf16", "auto"),
        default=["fp32"],
        help="the image encoder's arithmetic on a CPU, one run each (default fp32)",
    )
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up image (slow CPUs)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sam_speed.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    w, h = (int(v) for v in args.size.lower().split("x"))
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (h, w, 3), dtype=np.uint8))
    rows = []
    print(
        f"{'family':<12} | prec | params | input | first click | next click | ratio | embedding | emb MiB"
        " | first click, embedding speed-up"
    )
    print(f"{'-' * 12}-+------+--------+-------+-------------+------------+-------+-----------+--------+--")
    for name in args.families:
        base = None
        for precision in args.precision:
            r = measure(name, image, args.clicks, args.device, warmup=not args.no_warmup, precision=precision)
            rows.append(r)
            base = base or r
            speedup = ""
            if r is not base:
                r["first_click_speedup"] = base["first_click_s"] / r["first_click_s"]
                r["embedding_speedup"] = base["embedding_s"] / r["embedding_s"]
                speedup = f"{r['first_click_speedup']:.2f}x, {r['embedding_speedup']:.2f}x"
            print(
                f"{name:<12} | {r['precision']:4} | {r['parameters_M']:5.1f}M | {r['input']:5d} | "
                f"{r['first_click_s'] * 1000:9.0f}ms | "
                f"{r['next_click_s'] * 1000:8.1f}ms | {r['ratio']:5.3f} | {r['embedding_s'] * 1000:7.0f}ms | "
                f"{r['embedding_MiB']:6.1f} | {speedup}"
            )
    result = {"device": args.device, "image": [w, h], "precision": args.precision, "results": rows}
    out = write_result(args.out, result)
    print(f"wrote {out}")
    slow = [r["family"] for r in rows if r["next_click_s"] >= 0.5 * r["embedding_s"]]
    if slow:
        print(f"a next click costs half an embedding or more (recomputed?) for: {', '.join(slow)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

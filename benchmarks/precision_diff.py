"""What bf16 changes in the engines' outputs on a CPU: GEM's features and score maps, LAVT's logits.

Random weights of the real architectures (GEM on ViT-B/16 at 448, LAVT Swin-B at 480), seeded, run by the
engines themselves once in fp32 and once in bf16 (``GROUNDLABEL_CPU_PRECISION``: ``cpu_precision`` of
their configs), on the same seeded images and prompts. Reported per engine:

- GEM: the relative difference ``‖bf16 − fp32‖ / ‖fp32‖`` of the dense features (unit patch features),
  the largest absolute difference of the raw cosine maps, and of the calibrated score maps (the softmax
  over prompts and background words, at the image's size), and the share of pixels whose best prompt
  changes;
- LAVT: the relative difference of the two-class logits, the largest absolute difference of the
  foreground probability, and the share of pixels whose mask (probability ≥ 0.5) changes;
- both: the wall time of each call and the growth of the process's peak RSS during it (VmHWM reset
  before each call), so that bf16's memory can be compared with fp32's.

On a CPU without native bf16 (AVX512-BF16 or AMX) bf16 is emulated and slow: the times say nothing of a
bf16 machine's speed there (``gem_speed.py --impls project project/bf16``, ``sam_speed.py --precision``
measure that). Writes ``benchmarks/results/precision_diff.json``.

    .venv/bin/python benchmarks/precision_diff.py [--engines gem lavt] [--images 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.common import write_result  # noqa: E402

PROMPTS = ["car", "person", "dog", "traffic light", "bicycle"]
EXPRESSIONS = ["the red car on the left", "a person holding an umbrella", "the dog behind the fence"]
PRECISIONS = ("fp32", "bf16")


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(call):
    """``(result, seconds, peak RSS growth in MiB)`` of ``call()``."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    base = _rss_mib()
    start = time.perf_counter()
    out = call()
    return out, time.perf_counter() - start, _hwm_mib() - base


def images(n: int, seed: int = 0) -> list[Image.Image]:
    """Seeded photo-sized noise with a few flat rectangles (some structure for the maps)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        arr = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
        for _ in range(4):
            y, x = rng.integers(0, 380), rng.integers(0, 520)
            arr[y : y + 100, x : x + 120] = rng.integers(0, 255, 3)
        out.append(Image.fromarray(arr))
    return out


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def gem_rows(pictures: list[Image.Image]) -> dict:
    from workers.models.gem import GemConfig, GemEngine

    out: dict = {"model": "ViT-B-16 random weights (seed 0)", "size": 448, "prompts": PROMPTS}
    feats, cos, maps = {}, {}, {}
    for precision in PRECISIONS:
        torch.manual_seed(0)
        config = GemConfig(model_name="ViT-B-16", pretrained=None, device="cpu", cpu_precision=precision)
        engine = GemEngine(config)
        engine.text_embeddings(PROMPTS)  # the text tower's time and memory are not the images'
        from workers.models.gem.engine import preprocess

        pixels = preprocess(pictures, config.input_size)
        feats[precision], seconds, peak = timed(lambda e=engine, p=pixels: e.patch_features(p).clone())
        cos[precision] = np.stack(engine.cosine_maps(pictures, PROMPTS))
        maps[precision] = np.stack(engine.heatmaps(pictures, PROMPTS))
        out[precision] = {
            "model_version": engine.model_version,
            "cpu_kernels": engine.tower.cpu_kernels,
            "features_s": seconds,
            "features_peak_growth_MiB": peak,
        }
        del engine
    best32, best16 = maps["fp32"].argmax(1), maps["bf16"].argmax(1)
    out["features_rel_diff"] = relative(feats["bf16"].numpy(), feats["fp32"].numpy())
    out["cosine_max_abs_diff"] = float(np.abs(cos["bf16"] - cos["fp32"]).max())
    out["cosine_rel_diff"] = relative(cos["bf16"], cos["fp32"])
    out["scores_max_abs_diff"] = float(np.abs(maps["bf16"] - maps["fp32"]).max())
    out["scores_mean_abs_diff"] = float(np.abs(maps["bf16"] - maps["fp32"]).mean())
    out["scores_rel_diff"] = relative(maps["bf16"], maps["fp32"])
    out["best_prompt_changed"] = float((best32 != best16).mean())
    return out


def lavt_rows(pictures: list[Image.Image], tmp: Path) -> dict:
    from workers.models.lavt import LavtConfig, LavtEngine
    from workers.models.lavt.synthetic import write_vocab
    from workers.models.lavt.text import load_tokenizer

    vocab = write_vocab(tmp / "vocab.txt")
    texts = [EXPRESSIONS[i % len(EXPRESSIONS)] for i in range(len(pictures))]
    out: dict = {"model": "LAVT Swin-B random weights (seed 0)", "size": 480, "expressions": texts}
    logits, probs = {}, {}
    for precision in PRECISIONS:
        torch.manual_seed(0)
        config = LavtConfig(variant="swin_b", device="cpu", tokenizer=str(vocab), cpu_precision=precision)
        engine = LavtEngine(config=config, tokenizer=load_tokenizer(str(vocab)))
        from workers.models.device import autocast_context
        from workers.models.lavt.engine import image_tensor
        from workers.models.lavt.text import tokenize

        ids, mask, _ = tokenize(engine.tokenizer, texts, config.max_tokens)
        batch = torch.stack([image_tensor(im, config.image_size) for im in pictures])

        def forward(e=engine, b=batch, i=ids, m=mask):
            with torch.inference_mode(), autocast_context(e.device, e.precision):
                return e.network(b, i, m, upsample=False).float()

        logits[precision], seconds, peak = timed(forward)
        probs[precision] = np.stack([p for p, _ in engine.probabilities(pictures, texts)])
        out[precision] = {
            "model_version": engine.model_version,
            "forward_s": seconds,
            "forward_peak_growth_MiB": peak,
        }
        del engine
    out["logits_rel_diff"] = relative(logits["bf16"].numpy(), logits["fp32"].numpy())
    out["logits_max_abs_diff"] = float((logits["bf16"] - logits["fp32"]).abs().max())
    out["probability_max_abs_diff"] = float(np.abs(probs["bf16"] - probs["fp32"]).max())
    out["probability_mean_abs_diff"] = float(np.abs(probs["bf16"] - probs["fp32"]).mean())
    out["mask_changed"] = float(((probs["bf16"] >= 0.5) != (probs["fp32"] >= 0.5)).mean())
    return out


def main() -> int:
    import tempfile

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engines", nargs="+", choices=("gem", "lavt"), default=["gem", "lavt"])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "precision_diff.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pictures = images(args.images)
    result: dict = {"images": args.images, "image_size": [640, 480]}
    if "gem" in args.engines:
        gem = result["gem"] = gem_rows(pictures)
        print(
            f"GEM ViT-B/16 448, random weights: features rel. diff {gem['features_rel_diff']:.2e}, "
            f"cosine max |diff| {gem['cosine_max_abs_diff']:.2e} (rel. {gem['cosine_rel_diff']:.2e}), "
            f"score maps max |diff| {gem['scores_max_abs_diff']:.2e}, mean {gem['scores_mean_abs_diff']:.2e} "
            f"(rel. {gem['scores_rel_diff']:.2e}), best prompt changed at "
            f"{100 * gem['best_prompt_changed']:.2f} % of pixels"
        )
        for p in PRECISIONS:
            print(
                f"  {p}: {gem[p]['model_version']} on {gem[p]['cpu_kernels']}, features "
                f"{gem[p]['features_s']:.1f} s, peak growth {gem[p]['features_peak_growth_MiB']:.0f} MiB"
            )
    if "lavt" in args.engines:
        with tempfile.TemporaryDirectory() as tmp:
            lavt = result["lavt"] = lavt_rows(pictures, Path(tmp))
        print(
            f"LAVT Swin-B 480, random weights: logits rel. diff {lavt['logits_rel_diff']:.2e} "
            f"(max |diff| {lavt['logits_max_abs_diff']:.2e}), probability max |diff| "
            f"{lavt['probability_max_abs_diff']:.2e}, mean {lavt['probability_mean_abs_diff']:.2e}, "
            f"mask changed at {100 * lavt['mask_changed']:.2f} % of pixels"
        )
        for p in PRECISIONS:
            print(
                f"  {p}: {lavt[p]['model_version']}, forward {lavt[p]['forward_s']:.1f} s, peak growth "
                f"{lavt[p]['forward_peak_growth_MiB']:.0f} MiB"
            )
    print(f"wrote {write_result(args.out, result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

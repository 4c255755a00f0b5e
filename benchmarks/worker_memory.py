"""Worker memory: peak RSS of the class-prompt path (GEM score maps → regions) on one huge image.

A 9000×9000 image with 20 class prompts goes through ``workers.pipeline.class_prompt_regions`` on the
tiny random GEM of the tests (its score maps have the real sizes: what matters here), with a
``PolygonLabels`` and a ``BrushLabels`` control at threshold 0 (every pixel is some label's: the worst
case). Each run is its own process and reports its peak RSS (``ru_maxrss``), the RSS before the call
(Python, torch, the model and the decoded image) and the seconds the call took:

- ``after``: this checkout (maps at the regions' working size, images in bounded groups);
- ``before``: an earlier revision (``--baseline``) extracted with ``git archive``, whose maps are
  float32 ``[prompts, H, W]`` at the original size: it needs about 0.33 GB per prompt at 9000×9000,
  so it runs with ``--before-prompts`` (3 by default) and the figure for 20 prompts is extrapolated
  linearly from 3 and 1 prompts.

    .venv/bin/python benchmarks/worker_memory.py
    .venv/bin/python benchmarks/worker_memory.py --size 4000 --skip-before
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_result  # noqa: E402

#: The last revision whose class-prompt path kept full-size score maps.
BASELINE = "7b9a24a"

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[4])  # the checkout's tests/: make_tiny_gem_engine
import numpy as np
from PIL import Image
from conftest import make_tiny_gem_engine
from groundlabel.spec import ControlSpec, LabelingSpec
from workers.pipeline import class_prompt_regions

size, prompts = int(sys.argv[1]), int(sys.argv[2])
controls = sys.argv[3].split(",")
labels = [f"thing{i}" for i in range(prompts)]
spec = LabelingSpec("image", "image", [
    ControlSpec(kind.lower(), kind, "image", labels, {lab: [lab] for lab in labels}, {}) for kind in controls
])
engine = make_tiny_gem_engine(seed=0)
rng = np.random.default_rng(0)
tile = Image.fromarray(rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8))
image = tile.resize((size, size), Image.NEAREST)
del tile
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
(out,) = class_prompt_regions(engine, spec, [image], threshold=0.0)
seconds = time.perf_counter() - t0
if isinstance(out, Exception):
    raise out
print(json.dumps({
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "rss_before_call_mb": rss_before / 1024,
    "seconds": seconds,
    "regions": len(out.results),
}))
"""


def measure(pythonpath: Path, size: int, prompts: int, controls: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", CHILD, str(size), str(prompts), controls, str(ROOT / "tests")]
    proc = subprocess.run(cmd, cwd=pythonpath, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=9000, help="image side in pixels (default 9000)")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--controls", default="PolygonLabels,BrushLabels")
    parser.add_argument("--baseline", default=BASELINE, help=f"revision measured as 'before' ({BASELINE})")
    parser.add_argument("--before-prompts", type=int, default=3, help="prompts for the baseline run")
    parser.add_argument("--skip-before", action="store_true")
    args = parser.parse_args()

    rows = []
    after = measure(ROOT, args.size, args.prompts, args.controls)
    rows.append({"code": "after", "prompts": args.prompts, **after})
    estimate = None
    if not args.skip_before:
        with tempfile.TemporaryDirectory() as tmp:
            old = Path(tmp)
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline], capture_output=True)
            if archive.returncode == 0:
                subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
                one = measure(old, args.size, 1, args.controls)
                many = measure(old, args.size, args.before_prompts, args.controls)
                rows.append({"code": f"before ({args.baseline})", "prompts": 1, **one})
                rows.append({"code": f"before ({args.baseline})", "prompts": args.before_prompts, **many})
                per_prompt = (many["peak_rss_mb"] - one["peak_rss_mb"]) / max(args.before_prompts - 1, 1)
                estimate = one["peak_rss_mb"] + per_prompt * (args.prompts - 1)
            else:
                print(f"(revision {args.baseline} not available: no 'before' rows)")

    print(
        f"worker memory: one {args.size}x{args.size} image, controls {args.controls}, threshold 0, tiny GEM"
    )
    print(
        f"{'code':<20} {'prompts':>7} {'peak RSS MB':>12} {'RSS before call MB':>19} "
        f"{'seconds':>8} {'regions':>8}"
    )
    for r in rows:
        print(
            f"{r['code']:<20} {r['prompts']:>7} {r['peak_rss_mb']:>12.0f} {r['rss_before_call_mb']:>19.0f} "
            f"{r['seconds']:>8.1f} {r['regions']:>8}"
        )
    if estimate is not None:
        print(f"before, {args.prompts} prompts (extrapolated): {estimate:.0f} MB")
    out = Path(__file__).resolve().parent / "results" / "worker_memory.json"
    meta = {"size": args.size, "controls": args.controls, "baseline": args.baseline}
    write_result(out, {"meta": meta, "rows": rows, "before_extrapolated_mb": estimate})
    return 0


if __name__ == "__main__":
    sys.exit(main())

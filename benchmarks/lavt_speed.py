"""LAVT inference speed: expressions per second at 480×480 and peak memory, per variant, batch and precision.

Random weights (speed does not depend on them); the network forward only (BERT + Swin with PWAM +
decoder, logits at 1/4 resolution), inputs already on the device. GPU when available: Swin-B and
Swin-T at batch 1, 8, 32 in fp32 and bf16 autocast. On CPU the default is Swin-B and Swin-T at batch 1
and 8, fp32 and bf16 autocast, one timed forward each.

    .venv/bin/python benchmarks/lavt_speed.py [--device auto] [--variants swin_b,swin_t]
        [--batches 1,8,32] [--precisions fp32,bf16] [--repeats N] [--size 480]

Writes ``benchmarks/results/lavt_speed.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import peak_rss_mib, write_result  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    import torch

    from workers.models.device import autocast_context, resolve_device
    from workers.models.lavt.config import LavtConfig
    from workers.models.lavt.model import LavtNetwork, count_parameters

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--variants", default="swin_b,swin_t")
    parser.add_argument("--batches", default=None, help="default: 1,8,32 on GPU, 1,8 on CPU")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--repeats", type=int, default=None, help="timed forwards (default 20 GPU, 1 CPU)")
    parser.add_argument("--size", type=int, default=480)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "lavt_speed.json"))
    args = parser.parse_args()

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    batches = [int(b) for b in (args.batches or ("1,8,32" if gpu else "1,8")).split(",")]
    repeats = args.repeats or (20 if gpu else 1)
    rows = []
    for variant in args.variants.split(","):
        torch.manual_seed(0)
        net = LavtNetwork(LavtConfig(variant=variant, device=str(device))).to(device).eval()
        params = count_parameters(net) / 1e6
        for precision in args.precisions.split(","):
            for batch in batches:
                image = torch.randn(batch, 3, args.size, args.size, device=device)
                ids = torch.zeros((batch, 20), dtype=torch.long, device=device)
                ids[:, :8] = torch.tensor([101, 1996, 2158, 1999, 1996, 2417, 3797, 102])
                mask = (ids > 0).long()
                if gpu:
                    torch.cuda.reset_peak_memory_stats(device)
                with torch.inference_mode(), autocast_context(device, precision):
                    if gpu or batch == batches[0]:  # warm-up (once per precision on CPU, where it is cheap)
                        net(image, ids, mask, upsample=False)
                    if gpu:
                        torch.cuda.synchronize(device)
                    start = time.perf_counter()
                    for _ in range(repeats):
                        net(image, ids, mask, upsample=False)
                    if gpu:
                        torch.cuda.synchronize(device)
                    seconds = (time.perf_counter() - start) / repeats
                peak = torch.cuda.max_memory_allocated(device) / 2**20 if gpu else peak_rss_mib()
                row = {
                    "variant": variant,
                    "params_M": round(params, 1),
                    "precision": precision,
                    "batch": batch,
                    "ms_per_batch": round(1000 * seconds, 1),
                    "expr_per_s": round(batch / seconds, 2),
                    "peak_MiB": round(peak),
                    "peak_kind": "cuda allocated" if gpu else "process RSS, peak so far",
                }
                rows.append(row)
                print(
                    f"{variant:7} {precision:5} batch {batch:3}: {row['expr_per_s']:8.2f} expr/s  "
                    f"{row['ms_per_batch']:9.1f} ms/batch  peak {row['peak_MiB']} MiB",
                    flush=True,
                )
                del image, ids, mask
        del net
        if gpu:
            torch.cuda.empty_cache()

    device_name = (
        torch.cuda.get_device_name(device) if gpu else f"CPU ({platform.processor() or platform.machine()})"
    )
    print(
        f"\nLAVT forward at {args.size}x{args.size}, {device_name}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {repeats} timed repeats"
    )
    print("| variant | params (M) | precision | batch | ms / batch | expressions / s | peak memory (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['params_M']} | {r['precision']} | {r['batch']} | {r['ms_per_batch']} | "
            f"{r['expr_per_s']} | {r['peak_MiB']} ({r['peak_kind']}) |"
        )
    out = write_result(
        args.out,
        {"device": device_name, "size": args.size, "repeats": repeats, "rows": rows},
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

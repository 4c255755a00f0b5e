"""LAVT training step time (what a *Start Training* job spends per step): seconds per optimiser step and
peak memory, per variant, batch and input size, with the training job's recipe (weighted CE, AdamW with
LAVT's parameter groups, bf16 autocast on CUDA).

Random weights and random inputs (the step time does not depend on them). A job's duration is about
``epochs × ⌈training refs / batch⌉ × step time`` plus the export and two evaluations of the held-out part.

    .venv/bin/python benchmarks/training_speed.py [--device auto] [--variants swin_b] [--batch 8]
        [--image-size 480] [--steps N]

Writes ``benchmarks/results/training_speed.json``.
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


def measure(variant: str, batch: int, image_size: int, steps: int, device) -> dict:
    """Seconds per training step of one variant, and the peak memory."""
    import torch

    from workers.models.device import autocast_context
    from workers.models.lavt.config import LavtConfig
    from workers.models.lavt.model import LavtNetwork
    from workers.models.lavt.train import parameter_groups, segmentation_loss

    gpu = device.type == "cuda"
    torch.manual_seed(0)
    config = LavtConfig(variant=variant, image_size=image_size, device=str(device))
    net = LavtNetwork(config).to(device).train()
    optimizer = torch.optim.AdamW(parameter_groups(net, 1e-2), lr=5e-5, weight_decay=1e-2)
    vocab = int(net.bert_model.config.vocab_size)
    image = torch.randn(batch, 3, image_size, image_size, device=device)
    target = torch.randint(0, 2, (batch, image_size, image_size), device=device)
    ids = torch.randint(1, vocab, (batch, config.max_tokens), device=device)
    mask = torch.ones_like(ids)

    def step() -> None:
        with autocast_context(device, config.precision):
            logits = net(image, ids, mask)
        loss = segmentation_loss(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up (kernels, allocator)
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if gpu:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    memory = torch.cuda.max_memory_allocated() / 2**20 if gpu else peak_rss_mib()
    return {
        "variant": variant,
        "batch": batch,
        "image_size": image_size,
        "seconds_per_step": seconds,
        "refs_per_second": batch / seconds,
        "peak_mib": memory,
    }


def main() -> int:
    import torch

    from workers.models.device import resolve_device

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--variants", default="swin_b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=480)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20 GPU, 2 CPU)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "training_speed.json"))
    args = parser.parse_args()

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    steps = args.steps or (20 if gpu else 2)
    rows = [measure(v, args.batch, args.image_size, steps, device) for v in args.variants.split(",")]
    print(
        f"device: {device} ({torch.cuda.get_device_name(device) if gpu else platform.processor() or 'cpu'})"
    )
    print("variant | batch | size | s/step | refs/s | peak MiB")
    for r in rows:
        print(
            f"{r['variant']:<7} | {r['batch']:>5} | {r['image_size']:>4} | {r['seconds_per_step']:6.3f} | "
            f"{r['refs_per_second']:6.1f} | {r['peak_mib']:8.0f}"
        )
    out = write_result(args.out, {"device": str(device), "steps": steps, "rows": rows})
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

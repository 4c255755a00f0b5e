"""GEM dense-feature speed: the project's GemVisionTower versus a naive GEM implementation.

The naive version is the official gem-torch code path written out: the blocks before GEM's path run as
open_clip 2.23 (the version gem-torch needs) runs them, sequence-first through
``F.multi_head_attention_forward``; GEM's blocks use explicit N×N attention matrices and softmax, the three
self-self branches (v-v, k-k, q-q) one after the other, and the last block's original attention, MLP and head
are computed too. Both run on the same random-weight CLIP (ViT-B-16 by default) in the same invocation under
``torch.inference_mode``; on CUDA both run under bf16 autocast.

    python benchmarks/gem_speed.py --device cpu --sizes 448 672 896 --batch 1 --threads 1 --rounds 2
    python benchmarks/gem_speed.py --device cuda --sizes 448 672 896 --batch 8

Each row has the best wall time and the best CPU time (``time.process_time``, all threads) per image; on a
machine shared with other work the CPU time with ``--threads 1`` is the steadier figure. ``--rounds N``
repeats the whole sweep N times (alternating the implementations) and keeps each one's best.

Prints a table and writes JSON (default ``benchmarks/results/gem_speed.json``). Peak memory: on CUDA the
growth of ``torch.cuda.max_memory_allocated`` over the loaded model; on CPU the growth of the process's peak
RSS (``resource.getrusage``) over the loaded model, each (implementation, size) in its own subprocess.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

IMPLS = ("project", "naive")


# ----------------------------------------------------------------------------- the naive reference
def official_block(block, x):
    """One unchanged block as open_clip 2.23 runs it inside gem-torch: tokens sequence-first, so
    ``nn.MultiheadAttention`` takes ``F.multi_head_attention_forward`` (not its batch-first fast path)."""
    import torch.nn.functional as F

    attn = block.attn
    h = block.ln_1(x).transpose(0, 1)
    out = F.multi_head_attention_forward(
        h,
        h,
        h,
        embed_dim_to_check=attn.embed_dim,
        num_heads=attn.num_heads,
        in_proj_weight=attn.in_proj_weight,
        in_proj_bias=attn.in_proj_bias,
        bias_k=None,
        bias_v=None,
        add_zero_attn=False,
        dropout_p=0.0,
        out_proj_weight=attn.out_proj.weight,
        out_proj_bias=attn.out_proj.bias,
        training=False,
        need_weights=False,
    )[0]
    x = x + block.ls_1(out.transpose(0, 1))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def naive_gem(visual, pixels, gem_depth: int = 7, iters: int = 1):
    """GEM as gem-torch computes it: explicit attention matrices, branches looped, the last block whole."""
    import torch
    import torch.nn.functional as F

    x = visual.conv1(pixels)
    gh, gw = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).reshape(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    pos = visual.positional_embedding
    g0 = tuple(visual.grid_size)
    if (gh, gw) != g0:
        grid = pos[1:].float().reshape(1, g0[0], g0[1], -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", antialias=True)
        pos = torch.cat([pos[:1], grid[0].permute(1, 2, 0).reshape(gh * gw, -1).to(pos.dtype)])
    x = visual.ln_pre(x + pos.to(x.dtype))
    blocks = visual.transformer.resblocks
    first = len(blocks) - (gem_depth - 1)
    for block in blocks[:first]:
        x = official_block(block, x)
    x_gem = x
    for block in blocks[first:]:
        attn = block.attn
        h = block.ln_1(x)
        b, n, c = h.shape
        nh = attn.num_heads
        d = c // nh
        qkv = (
            F.linear(h, attn.in_proj_weight, attn.in_proj_bias).reshape(b, n, 3, nh, d).permute(2, 0, 3, 1, 4)
        )
        q, k, v = qkv[0], qkv[1], qkv[2]
        scale = d**-0.5
        ori = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1) @ v
        ori = attn.out_proj(ori.transpose(1, 2).reshape(b, n, c))
        inv_temp = h.norm(dim=-1).mean(dim=-1).reshape(b, 1, 1, 1) * scale
        branches = [v, k, q]
        for _ in range(iters):
            for i in range(3):
                z = F.normalize(branches[i], dim=-1)
                branches[i] = ((z @ z.transpose(-2, -1)) * inv_temp).softmax(dim=-1) @ z
        out = 0
        for i in range(3):
            z = F.normalize(branches[i], dim=-1)
            out = out + ((z @ z.transpose(-2, -1)) * inv_temp).softmax(dim=-1) @ v
        gem = attn.out_proj((out / 3).transpose(1, 2).reshape(b, n, c))
        x_new = x + block.ls_1(ori)
        x = x_new + block.ls_2(block.mlp(block.ln_2(x_new)))
        x_gem = x_gem + block.ls_1(gem)
    return visual.ln_post(x_gem) @ visual.proj, visual.ln_post(x) @ visual.proj


# ----------------------------------------------------------------------------- measurement
def build(model_name: str, device: str, threads: int | None):
    import open_clip
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = open_clip.create_model(model_name, pretrained=None).eval().to(device)
    from workers.models.gem import GemVisionTower

    return model, GemVisionTower(model.visual, gem_depth=7)


def runner(impl: str, model, tower, device: str):
    import torch

    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()

    def run(pixels):
        with torch.inference_mode(), amp:
            if impl == "project":
                return tower(pixels)
            return naive_gem(model.visual, pixels)

    return run


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(impl: str, size: int, args) -> dict:
    """Time one implementation at one size in this process."""
    import torch

    model, tower = build(args.model, args.device, args.threads)
    run = runner(impl, model, tower, args.device)
    pixels = torch.randn(args.batch, 3, size, size, device=args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    gc.collect()
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = current_rss_mib()
    try:
        for _ in range(args.warmup):
            run(pixels)
        sync()
        times, cpu_times = [], []
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            run(pixels)
            sync()
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    except torch.OutOfMemoryError:
        return {"impl": impl, "size": size, "batch": args.batch, "error": "out of memory"}
    if args.device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    best = min(times)
    patch = tower.patch_size[0]
    return {
        "impl": impl,
        "size": size,
        "batch": args.batch,
        "tokens": 1 + (size // patch) ** 2,
        "images_per_s": args.batch / best,
        "ms_per_image": 1000 * best / args.batch,
        "mean_ms_per_image": 1000 * sum(times) / len(times) / args.batch,
        "cpu_ms_per_image": 1000 * min(cpu_times) / args.batch,
        "peak_mem_mib": peak,
    }


def agreement(args) -> dict:
    """Largest relative difference between the two implementations' GEM and CLIP tokens (batch 2)."""
    import torch

    model, tower = build(args.model, args.device, args.threads)
    size = min(args.sizes)
    pixels = torch.randn(2, 3, size, size, device=args.device)
    gem_p, ori_p = runner("project", model, tower, args.device)(pixels)
    gem_n, ori_n = runner("naive", model, tower, args.device)(pixels)

    def rel(a, b):
        return float((a.float() - b.float()).abs().max() / b.float().abs().max())

    return {"size": size, "gem_rel_diff": rel(gem_p, gem_n), "original_rel_diff": rel(ori_p, ori_n)}


def measure_in_subprocess(impl: str, size: int, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        impl,
        "--device",
        args.device,
        "--sizes",
        str(size),
        "--batch",
        str(args.batch),
        "--model",
        args.model,
        "--repeats",
        str(args.repeats),
        "--warmup",
        str(args.warmup),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"impl": impl, "size": size, "batch": args.batch, "error": proc.stderr.strip()[-300:]}
    return json.loads(lines[-1])


def table(rows: list[dict]) -> str:
    head = (
        "| impl | size | batch | tokens | images/s | ms/image | CPU ms/image | peak mem (MiB) "
        "| speed-up (wall) | speed-up (CPU) | memory ratio |"
    )
    out = [head, "|" + "---|" * 11]
    naive = {r["size"]: r for r in rows if r["impl"] == "naive" and "error" not in r}
    for r in rows:
        if "error" in r:
            error = r["error"][:60]
            out.append(f"| {r['impl']} | {r['size']} | {r['batch']} | | error: {error} |" + " |" * 6)
            continue
        ref = naive.get(r["size"])
        speed = f"{r['images_per_s'] / ref['images_per_s']:.2f}x" if ref else ""
        cpu = f"{ref['cpu_ms_per_image'] / r['cpu_ms_per_image']:.2f}x" if ref else ""
        mem = f"{r['peak_mem_mib'] / ref['peak_mem_mib']:.2f}" if ref and ref["peak_mem_mib"] > 0 else ""
        out.append(
            f"| {r['impl']} | {r['size']} | {r['batch']} | {r['tokens']} | {r['images_per_s']:.2f} | "
            f"{r['ms_per_image']:.1f} | {r['cpu_ms_per_image']:.1f} | {r['peak_mem_mib']:.0f} | {speed} | "
            f"{cpu} | {mem} |"
        )
    return "\n".join(out)


def best_of(runs: list[dict]) -> dict:
    """One row from several rounds of one (implementation, size): the best time, CPU time and memory."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    best = dict(min(ok, key=lambda r: r["ms_per_image"]))
    best["cpu_ms_per_image"] = min(r["cpu_ms_per_image"] for r in ok)
    best["peak_mem_mib"] = min(r["peak_mem_mib"] for r in ok)
    best["images_per_s"] = 1000 / best["ms_per_image"]
    best["rounds"] = len(ok)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=None,
        help="square input sizes (default: 448 672 on CPU, 448 672 896 on CUDA)",
    )
    parser.add_argument("--batch", type=int, default=None, help="images per forward (default: 2 CPU, 8 CUDA)")
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default: 2 CPU, 10 CUDA)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the sweep, keep each row's best")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "gem_speed.json"))
    parser.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.sizes = args.sizes or ([448, 672, 896] if cuda else [448, 672])
    args.batch = args.batch or (8 if cuda else 2)
    args.repeats = args.repeats or (10 if cuda else 2)

    if args.child:
        print(json.dumps(measure(args.child, args.sizes[0], args)))
        return 0

    import torch

    if cuda and not torch.cuda.is_available():
        print("CUDA is not available on this machine", file=sys.stderr)
        return 2
    runs: dict[tuple[str, int], list[dict]] = {}
    for rnd in range(args.rounds):
        for size in args.sizes:
            order = IMPLS if rnd % 2 == 0 else IMPLS[::-1]
            for impl in order:
                row = measure(impl, size, args) if cuda else measure_in_subprocess(impl, size, args)
                runs.setdefault((impl, size), []).append(row)
                print(
                    f"  round {rnd + 1} {impl:8s} {size}: "
                    f"{row.get('ms_per_image', float('nan')):.0f} ms/image, "
                    f"{row.get('cpu_ms_per_image', float('nan')):.0f} CPU ms/image",
                    file=sys.stderr,
                )
                if cuda:
                    gc.collect()
                    torch.cuda.empty_cache()
    rows = [best_of(runs[(impl, size)]) for size in args.sizes for impl in IMPLS]
    agree = agreement(args)
    device_name = torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine())
    threads = args.threads or torch.get_num_threads()
    print(
        f"GEM dense features, {args.model} random weights, {args.device} ({device_name}), "
        f"torch {torch.__version__}, threads {threads}, {'bf16 autocast' if cuda else 'fp32'}, "
        f"best of {args.repeats} after {args.warmup} warm-up, {args.rounds} round(s)"
    )
    print(table(rows))
    print(
        f"agreement at {agree['size']}: GEM tokens rel. diff {agree['gem_rel_diff']:.2e}, "
        f"CLIP tokens rel. diff {agree['original_rel_diff']:.2e}"
    )
    result = {
        "benchmark": "gem_speed",
        "model": args.model,
        "device": args.device,
        "device_name": device_name,
        "torch": torch.__version__,
        "threads": threads,
        "precision": "bf16-autocast" if cuda else "fp32",
        "repeats": args.repeats,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "results": rows,
        "agreement": agree,
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""GEM dense-feature speed: the project's GemVisionTower versus a naive GEM implementation.

The naive version is the official gem-torch code path written out: the blocks before GEM's path run as
open_clip 2.23 (the version gem-torch needs) runs them, sequence-first through
``F.multi_head_attention_forward``; GEM's blocks use explicit N×N attention matrices and softmax, the three
self-self branches (v-v, k-k, q-q) one after the other, and the last block's original attention, MLP and head
are computed too. Both run on the same random-weight CLIP (ViT-B-16 by default) in the same invocation under
``torch.inference_mode``; on CUDA both run under bf16 autocast. The project's tower is timed on the call the
GEM engine makes, ``dense_features(pixels, "gem")`` (the GEM tokens, the same numbers as gem-torch's
``feat_gem``, without the last block's original attention and MLP that nothing reads); ``--path both`` times
``GemVisionTower.forward`` instead, which returns the CLIP tokens as well.

``--official DIR`` adds the official ``gem-torch`` itself (its ``GEMWrapper`` on ``open_clip_torch`` 2.23.0,
the version it needs) as a third implementation: DIR is a folder where both are importable, e.g. made with
``pip install --no-deps --target DIR gem_torch==1.0.1 open_clip_torch==2.23.0 einops``. It runs in its own
subprocess with DIR first on ``sys.path``, on the very weights of the other two (a state dict saved by this
script), so that its output can be compared with this tower's. Only ``gem.gem_wrapper`` and
``gem.gem_utils`` are imported (``gem/__init__`` pulls in plotting packages the forward does not use).
``--baseline DIR`` times the ``GemVisionTower`` of another checkout of this project too (e.g. an earlier
commit unpacked with ``git archive``), for before/after comparisons in one run; ``--impls`` picks which
implementations run (``project``, ``naive``, ``gem-torch``, ``baseline``).

    python benchmarks/gem_speed.py --device cpu --sizes 448 672 896 --batch 1 --threads 1 --rounds 5 \
        --official /path/to/gem-torch-folder
    python benchmarks/gem_speed.py --device cuda --sizes 448 672 896 --batch 8

Every (implementation, size) is measured in its own subprocess per round, the order of the implementations
rotating from round to round (``--rounds N``), so that they share the machine's load alike. Each row has
the median over the rounds of each round's median wall time and CPU time (``time.process_time``, all
threads) per image, the best wall time, and the speed-ups as the median of the per-round ratios (each
ratio from one round, whose runs followed one another). On a machine shared with other work the CPU time
with ``--threads 1`` is the steadier figure; the load average is recorded before and after.

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
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import peak_rss_mib  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

IMPLS = ("project", "naive")
OFFICIAL = "gem-torch"
BASELINE = "baseline"


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


def official_runner(folder: str, model_name: str, weights: str, device: str):
    """The official gem-torch's forward (``GEMWrapper`` on open_clip 2.23 from ``folder``) on ``weights``."""
    import types

    sys.path.insert(0, str(Path(folder).resolve()))
    for name in [m for m in sys.modules if m == "open_clip" or m.startswith("open_clip.")]:
        del sys.modules[name]
    import open_clip
    import torch

    package = types.ModuleType("gem")  # gem/__init__ imports matplotlib for its plotting helpers only
    package.__path__ = [str(Path(folder).resolve() / "gem")]
    sys.modules["gem"] = package
    from gem.gem_wrapper import GEMWrapper

    if not str(Path(open_clip.__file__).resolve()).startswith(str(Path(folder).resolve())):
        raise RuntimeError(f"open_clip was not imported from {folder}: {open_clip.__file__}")
    model = open_clip.create_model(model_name, pretrained=None).eval()
    model.load_state_dict(torch.load(weights, map_location="cpu"))
    model = model.to(device)
    GEMWrapper(model, None, depth=7)  # swaps the last 6 blocks and the tower's forward in place
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()

    def run(pixels):
        with torch.inference_mode(), amp:
            return model.visual(pixels)

    return run, int(model.visual.patch_size[0])


# ----------------------------------------------------------------------------- measurement
def build(model_name: str, device: str, threads: int | None, tree: str | None = None):
    """The random-weight CLIP (seed 0) and a ``GemVisionTower`` on it, from this checkout or ``tree``."""
    if tree:
        sys.path.insert(0, str(Path(tree).resolve()))
    import open_clip
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = open_clip.create_model(model_name, pretrained=None).eval().to(device)
    from workers.models.gem import GemVisionTower

    if tree and not str(Path(sys.modules["workers"].__path__[0]).resolve()).startswith(
        str(Path(tree).resolve())
    ):
        raise RuntimeError(f"workers was not imported from {tree}")

    return model, GemVisionTower(model.visual, gem_depth=7)


def runner(impl: str, model, tower, device: str, path: str = "gem"):
    """The forward to time: the project's tower on ``path`` (``gem``: GEM tokens alone, as the engine asks for
    them; ``both``: GEM and CLIP tokens), or the naive reference (always both, as gem-torch)."""
    import torch

    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()

    def run(pixels):
        with torch.inference_mode(), amp:
            if impl == "project":
                return tower.dense_features(pixels, "gem") if path == "gem" else tower(pixels)
            return naive_gem(model.visual, pixels)

    return run


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(impl: str, size: int, args) -> dict:
    """Time one implementation at one size in this process."""
    import torch

    if impl == OFFICIAL:
        if args.threads:
            torch.set_num_threads(args.threads)
        run, patch = official_runner(args.official, args.model, args.weights, args.device)
    else:
        tree = args.baseline if impl == BASELINE else None
        model, tower = build(args.model, args.device, args.threads, tree)
        run = runner("project" if impl == BASELINE else impl, model, tower, args.device, args.path)
        patch = tower.patch_size[0]
    with contextlib.suppress(OSError):  # reset the peak RSS: loading the weights is not the forward's
        Path("/proc/self/clear_refs").write_text("5")
    pixels = torch.randn(args.batch, 3, size, size, device=args.device)
    if args.tokens_out:  # the GEM tokens of a seeded input, for the agreement check
        gen = torch.Generator().manual_seed(1)
        probe = torch.randn(2, 3, size, size, generator=gen).to(args.device)
        torch.save(run(probe)[0].float().cpu(), args.tokens_out)
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
        peak = peak_rss_mib() - base
    best = min(times)
    return {
        "impl": impl,
        "size": size,
        "batch": args.batch,
        "tokens": 1 + (size // patch) ** 2,
        "images_per_s": args.batch / best,
        "ms_per_image": 1000 * best / args.batch,
        "mean_ms_per_image": 1000 * sum(times) / len(times) / args.batch,
        "median_ms_per_image": 1000 * statistics.median(times) / args.batch,
        "median_cpu_ms_per_image": 1000 * statistics.median(cpu_times) / args.batch,
        "cpu_ms_per_image": 1000 * min(cpu_times) / args.batch,
        "peak_mem_mib": peak,
    }


def agreement(args) -> dict:
    """Largest relative difference between the two implementations' GEM and CLIP tokens (batch 2)."""
    import torch

    model, tower = build(args.model, args.device, args.threads)
    size = min(args.sizes)
    pixels = torch.randn(2, 3, size, size, device=args.device)
    gem_p = runner("project", model, tower, args.device, "gem")(pixels)
    both_p, ori_p = runner("project", model, tower, args.device, "both")(pixels)
    gem_n, ori_n = runner("naive", model, tower, args.device)(pixels)

    def rel(a, b):
        return float((a.float() - b.float()).abs().max() / b.float().abs().max())

    result = {
        "size": size,
        "gem_rel_diff": rel(gem_p, gem_n),
        "gem_both_rel_diff": rel(both_p, gem_n),
        "original_rel_diff": rel(ori_p, ori_n),
    }
    if args.official:
        gen = torch.Generator().manual_seed(1)
        probe = torch.randn(2, 3, size, size, generator=gen).to(args.device)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "tokens.pt"
            row = measure_in_subprocess(OFFICIAL, size, args, tokens_out=str(out), repeats=1)
            if "error" in row:
                result["official_error"] = row["error"]
            else:
                mine = runner("project", model, tower, args.device, "gem")(probe)
                result["official_gem_rel_diff"] = rel(mine, torch.load(out).to(args.device))
    return result


def measure_in_subprocess(
    impl: str, size: int, args, *, tokens_out: str | None = None, repeats: int | None = None
) -> dict:
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
        str(repeats or args.repeats),
        "--warmup",
        str(args.warmup),
        "--path",
        args.path,
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if impl == OFFICIAL:
        cmd += ["--official", args.official, "--weights", args.weights]
    if impl == BASELINE:
        cmd += ["--baseline", args.baseline]
    if tokens_out:
        cmd += ["--tokens-out", tokens_out]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"impl": impl, "size": size, "batch": args.batch, "error": proc.stderr.strip()[-300:]}
    return json.loads(lines[-1])


def table(rows: list[dict], ratios: dict) -> str:
    head = (
        "| impl | size | batch | tokens | ms/image (median) | CPU ms/image (median) | best ms/image | "
        "peak mem (MiB) | project's speed-up (wall) | project's speed-up (CPU) |"
    )
    out = [head, "|" + "---|" * 10]
    for r in rows:
        if "error" in r:
            error = r["error"][:60]
            out.append(f"| {r['impl']} | {r['size']} | {r['batch']} | | error: {error} |" + " |" * 5)
            continue
        wall, cpu = ratios.get((r["impl"], r["size"]), (None, None))
        out.append(
            f"| {r['impl']} | {r['size']} | {r['batch']} | {r['tokens']} | {r['ms_per_image']:.1f} | "
            f"{r['cpu_ms_per_image']:.1f} | {r['best_ms_per_image']:.1f} | {r['peak_mem_mib']:.0f} | "
            f"{f'{wall:.2f}x' if wall else ''} | {f'{cpu:.2f}x' if cpu else ''} |"
        )
    return "\n".join(out)


def summarize(runs: list[dict]) -> dict:
    """One row from the rounds of one (implementation, size): medians of the per-round medians, the best
    wall time, the smallest peak memory."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    row = dict(ok[0])
    row["ms_per_image"] = statistics.median(r["median_ms_per_image"] for r in ok)
    row["cpu_ms_per_image"] = statistics.median(r["median_cpu_ms_per_image"] for r in ok)
    row["best_ms_per_image"] = min(r["ms_per_image"] for r in ok)
    row["peak_mem_mib"] = min(r["peak_mem_mib"] for r in ok)
    row["images_per_s"] = 1000 / row["ms_per_image"]
    row["rounds"] = len(ok)
    row["per_round_ms"] = [round(r["median_ms_per_image"], 1) for r in ok]
    row["per_round_cpu_ms"] = [round(r["median_cpu_ms_per_image"], 1) for r in ok]
    for key in ("median_ms_per_image", "median_cpu_ms_per_image", "mean_ms_per_image"):
        row.pop(key, None)
    return row


def round_ratios(runs: dict, impls: tuple[str, ...], sizes: list[int], rounds: int) -> dict:
    """The project's speed-up over each other implementation: the median over rounds of the ratio of the
    two implementations' medians within a round (wall, CPU)."""
    out = {}
    for size in sizes:
        mine = runs[("project", size)]
        for impl in impls:
            if impl == "project":
                continue
            walls, cpus = [], []
            for a, b in zip(mine, runs[(impl, size)], strict=True):
                if "error" in a or "error" in b:
                    continue
                walls.append(b["median_ms_per_image"] / a["median_ms_per_image"])
                cpus.append(b["median_cpu_ms_per_image"] / a["median_cpu_ms_per_image"])
            if walls:
                out[(impl, size)] = (statistics.median(walls), statistics.median(cpus))
    return out


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
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default: 3 CPU, 10 CUDA)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--path",
        choices=("gem", "both"),
        default="gem",
        help="what the project's tower computes: gem = GEM tokens alone, the engine's call (default); "
        "both = GEM and CLIP tokens (GemVisionTower.forward). The naive path and gem-torch compute both",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (every implementation)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the sweep, rotating the order")
    parser.add_argument(
        "--official", default=None, help="a folder with gem-torch and open_clip_torch 2.23 to time as well"
    )
    parser.add_argument("--baseline", default=None, help="another checkout of this project to time as well")
    parser.add_argument(
        "--impls", nargs="+", choices=(*IMPLS, OFFICIAL, BASELINE), default=None, help="which to run"
    )
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "gem_speed.json"))
    parser.add_argument("--child", choices=(*IMPLS, OFFICIAL, BASELINE), help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--tokens-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.sizes = args.sizes or ([448, 672, 896] if cuda else [448, 672])
    args.batch = args.batch or (8 if cuda else 2)
    args.repeats = args.repeats or (10 if cuda else 3)
    if args.official and not (Path(args.official) / "gem" / "gem_wrapper.py").is_file():
        parser.error(f"--official {args.official}: no gem/gem_wrapper.py (gem-torch) in that folder")

    if args.child:
        print(json.dumps(measure(args.child, args.sizes[0], args)))
        return 0

    import torch

    if cuda and not torch.cuda.is_available():
        print("CUDA is not available on this machine", file=sys.stderr)
        return 2
    impls = tuple(
        args.impls or (*IMPLS, *([OFFICIAL] if args.official else []), *([BASELINE] if args.baseline else []))
    )
    if "project" not in impls:
        parser.error("--impls must include project (the speed-ups are the project's)")
    if OFFICIAL in impls and not args.official:
        parser.error("gem-torch needs --official DIR")
    if BASELINE in impls and not args.baseline:
        parser.error("baseline needs --baseline DIR")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        if args.official:
            model, _ = build(args.model, "cpu", args.threads)
            args.weights = str(Path(tmp) / "weights.pt")
            torch.save(model.state_dict(), args.weights)
            del model
        runs: dict[tuple[str, int], list[dict]] = {}
        for rnd in range(args.rounds):
            for size in args.sizes:
                shift = rnd % len(impls)
                order = impls[shift:] + impls[:shift]
                for impl in order:
                    in_process = cuda and impl in IMPLS
                    row = measure(impl, size, args) if in_process else measure_in_subprocess(impl, size, args)
                    runs.setdefault((impl, size), []).append(row)
                    print(
                        f"  round {rnd + 1} {impl:9s} {size}: "
                        f"{row.get('median_ms_per_image', float('nan')):.0f} ms/image, "
                        f"{row.get('median_cpu_ms_per_image', float('nan')):.0f} CPU ms/image "
                        f"(load {os.getloadavg()[0]:.1f})",
                        file=sys.stderr,
                    )
                    if cuda:
                        gc.collect()
                        torch.cuda.empty_cache()
        agree = agreement(args)
    load_after = os.getloadavg()
    rows = [summarize(runs[(impl, size)]) for size in args.sizes for impl in impls]
    ratios = round_ratios(runs, impls, args.sizes, args.rounds)
    device_name = torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine())
    threads = args.threads or torch.get_num_threads()
    print(
        f"GEM dense features, {args.model} random weights, {args.device} ({device_name}), "
        f"torch {torch.__version__}, threads {threads}, {'bf16 autocast' if cuda else 'fp32'}, "
        f"project path {args.path}, "
        f"median of {args.repeats} after {args.warmup} warm-up per round, {args.rounds} round(s), "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after"
    )
    print(table(rows, ratios))
    line = (
        f"agreement at {agree['size']}: GEM tokens rel. diff {agree['gem_rel_diff']:.2e}, "
        f"CLIP tokens rel. diff {agree['original_rel_diff']:.2e} (naive path)"
    )
    if "official_gem_rel_diff" in agree:
        line += f"; GEM tokens rel. diff {agree['official_gem_rel_diff']:.2e} (gem-torch)"
    print(line)
    result = {
        "benchmark": "gem_speed",
        "model": args.model,
        "device": args.device,
        "device_name": device_name,
        "torch": torch.__version__,
        "threads": threads,
        "precision": "bf16-autocast" if cuda else "fp32",
        "project_path": args.path,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "load_average": {"before": load_before, "after": load_after},
        "results": rows,
        "speedups": [
            {"versus": impl, "size": size, "wall": wall, "cpu": cpu}
            for (impl, size), (wall, cpu) in ratios.items()
        ],
        "agreement": agree,
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

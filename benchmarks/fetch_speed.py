"""Image fetching speed: milliseconds per image through ``workers.fetch.fetch_image`` by source.

Sources: a file under ``LOCAL_FILES_DOCUMENT_ROOT`` (``/data/local-files/?d=...``), an allowed HTTP host
on loopback (``http.server`` in a thread), and a ``data:`` URI; with ``--label-studio URL`` also Label
Studio's ``/data/local-files/`` over HTTP with ``--api-key`` (a legacy token or a personal access token:
the first request of a PAT includes the token exchange, later ones reuse the cached access token).

    .venv/bin/python benchmarks/fetch_speed.py [--repeat 20] [--label-studio URL --api-key KEY --ls-path D]

Prints a table and writes ``benchmarks/results/fetch_speed.json``.
"""

from __future__ import annotations

import argparse
import base64
import statistics
import sys
import tempfile
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_result  # noqa: E402
from groundlabel.ls_access import FetchSettings, clear_token_cache  # noqa: E402
from workers.fetch import fetch_image  # noqa: E402


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def _images(folder: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    out = {}
    for name, (w, h), fmt in (("640x480.png", (640, 480), "PNG"), ("2048x1536.jpg", (2048, 1536), "JPEG")):
        pixels = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        pixels[h // 4 : h // 2, w // 4 : w // 2] = (220, 60, 40)
        path = folder / name
        Image.fromarray(pixels).save(path, format=fmt, quality=90)
        out[name] = path
    return out


def _time(fn, repeat: int) -> tuple[float, float, float]:
    first_start = time.perf_counter()
    fn()
    first = (time.perf_counter() - first_start) * 1000
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return first, statistics.median(samples), min(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--label-studio", default=None, help="a running Label Studio URL")
    parser.add_argument("--api-key", default=None, help="its legacy token or personal access token")
    parser.add_argument("--ls-path", default=None, help="a local-files path (d=...) Label Studio serves")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        images = _images(folder)
        server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(folder)))
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        port = server.server_address[1]
        local = FetchSettings(local_files_root=str(folder))
        http = FetchSettings(allowed_hosts=(f"127.0.0.1:{port}",))
        for name, path in images.items():
            size = path.stat().st_size
            uri = "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()
            cases = {
                "local-files root": lambda n=name: fetch_image(f"/data/local-files/?d={n}", settings=local),
                "http allowed host": lambda n=name: fetch_image(
                    f"http://127.0.0.1:{port}/{n}", settings=http
                ),
                "data: URI": lambda u=uri: fetch_image(u, settings=local),
            }
            for source, fn in cases.items():
                first, median, best = _time(fn, args.repeat)
                rows.append(
                    {
                        "source": source,
                        "image": name,
                        "bytes": size,
                        "first_ms": first,
                        "median_ms": median,
                        "min_ms": best,
                    }
                )
        server.shutdown()

    if args.label_studio and args.api_key and args.ls_path:
        clear_token_cache()
        ls = FetchSettings(label_studio_url=args.label_studio, api_key=args.api_key)
        url = f"/data/local-files/?d={args.ls_path}"
        first, median, best = _time(lambda: fetch_image(url, settings=ls), args.repeat)
        kind = "PAT" if args.api_key.count(".") == 2 else "legacy token"
        rows.append(
            {
                "source": f"Label Studio ({kind})",
                "image": args.ls_path,
                "bytes": None,
                "first_ms": first,
                "median_ms": median,
                "min_ms": best,
            }
        )

    header = f"{'source':<28} {'image':<16} {'bytes':>9} {'first ms':>9} {'median ms':>10} {'min ms':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        size = "" if r["bytes"] is None else str(r["bytes"])
        print(
            f"{r['source']:<28} {r['image']:<16} {size:>9} {r['first_ms']:>9.1f} "
            f"{r['median_ms']:>10.1f} {r['min_ms']:>8.1f}"
        )
    out = ROOT / "benchmarks" / "results" / "fetch_speed.json"
    write_result(out, {"meta": {"repeat": args.repeat}, "rows": rows})
    print(f"\nwritten {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

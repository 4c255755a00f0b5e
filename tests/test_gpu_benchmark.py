"""benchmarks/gpu.py: the clean skip without CUDA, and its measuring code on tiny models on the CPU."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu.py"

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
_COPIES = itertools.count()


def load_benchmark():
    """A fresh copy of the script as a module (its own engine registry)."""
    name = f"gpu_benchmark_{next(_COPIES)}"
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through the module
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_skips_cleanly_and_says_so(tmp_path):
    out = tmp_path / "gpu.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "CUDA is not available on this machine: GPU benchmark skipped" in proc.stdout
    result = json.loads(out.read_text())
    assert result["skipped"] is True
    assert result["reason"] == "CUDA is not available on this machine"
    assert result["rows"] == [] and result["benchmark"] == "gpu"
    assert result["batches"] == [1, 8, 32] and result["precisions"] == ["bf16", "fp32"]


QUICK_ENGINES = ("gem", "lavt", "sam-sam")


def test_quick_cpu_run_measures_each_engine_at_every_batch_and_precision(tmp_path):
    bench = load_benchmark()
    assert {"gem", "lavt", "sam-sam", "sam-sam2", "sam-sam_hq", "sam-edgetam", "sam-sam3_tracker"} <= set(
        bench.ENGINES
    )
    out = tmp_path / "quick.json"
    argv = ["--device", "cpu", "--quick", "--engines", ",".join(QUICK_ENGINES), "--out", str(out)]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["skipped"] is False and result["quick"] is True
    assert set(result["engines"]) == set(QUICK_ENGINES)
    for name in QUICK_ENGINES:
        assert result["engines"][name]["skipped"] is False
        assert result["engines"][name]["description"]
    rows = result["rows"]
    expected = {(e, p, b) for e in QUICK_ENGINES for p in ("bf16", "fp32") for b in (1, 2)}
    assert {(r["engine"], r["precision"], r["batch"]) for r in rows} == expected
    assert len(rows) == len(expected)
    for r in rows:
        assert "error" not in r, r
        assert r["repeats"] == 2
        assert 0 < r["latency_ms_p50"] <= r["latency_ms_p99"]
        assert r["images_per_s"] == pytest.approx(1000 * r["batch"] / r["latency_ms_p50"], rel=1e-2)
        assert r["peak_gpu_mib"] is None and r["peak_over_model_mib"] is None  # CPU: no GPU memory


@pytest.mark.slow
def test_quick_cpu_run_of_every_other_registered_engine(tmp_path):
    bench = load_benchmark()
    others = [name for name in bench.ENGINES if name not in QUICK_ENGINES]
    out = tmp_path / "others.json"
    argv = ["--device", "cpu", "--quick", "--engines", ",".join(others), "--batches", "1"]
    assert (
        bench.main([*argv, "--precisions", "fp32", "--repeats", "1", "--warmup", "0", "--out", str(out)]) == 0
    )
    result = json.loads(out.read_text())
    assert [r["engine"] for r in result["rows"]] == others
    assert all("error" not in r and r["images_per_s"] > 0 for r in result["rows"])


def test_an_engine_is_a_few_lines_and_missing_modules_skip_it(tmp_path):
    bench = load_benchmark()

    @bench.register("linear")
    def _linear(device, quick):
        layer = torch.nn.Linear(16, 4).to(device)
        return bench.Case("a linear layer", inputs=lambda b: torch.randn(b, 16, device=device), forward=layer)

    bench.register("absent", requires=("groundlabel_module_that_does_not_exist",))(_linear)
    with pytest.raises(ValueError, match="registered twice"):
        bench.register("linear")(_linear)
    out = tmp_path / "few.json"
    argv = ["--device", "cpu", "--engines", "linear,absent", "--batches", "1,3", "--precisions", "fp32"]
    assert bench.main([*argv, "--repeats", "7", "--warmup", "0", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["engines"]["absent"] == {
        "skipped": True,
        "reason": "module 'groundlabel_module_that_does_not_exist' is not installed",
    }
    assert result["engines"]["linear"]["description"] == "a linear layer"
    measured = [(r["engine"], r["batch"], r["repeats"]) for r in result["rows"]]
    assert measured == [("linear", 1, 7), ("linear", 3, 7)]


def test_out_of_memory_is_recorded_and_the_other_rows_go_on(tmp_path):
    bench = load_benchmark()

    def forward(x):
        if x.shape[0] > 1:
            raise torch.OutOfMemoryError("simulated: the batch does not fit")
        return x * 2

    bench.register("fragile")(lambda device, quick: bench.Case("fails above batch 1", torch.ones, forward))
    out = tmp_path / "oom.json"
    argv = ["--device", "cpu", "--engines", "fragile", "--batches", "1,2", "--precisions", "bf16,fp32"]
    assert bench.main([*argv, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["precision"], r["batch"], r.get("error")) for r in rows] == [
        ("bf16", 1, None),
        ("bf16", 2, "out of memory"),
        ("fp32", 1, None),
        ("fp32", 2, "out of memory"),
    ]
    assert "out of memory" in bench.table(rows)


def test_percentile_matches_numpy_and_bad_arguments_are_refused():
    bench = load_benchmark()
    values = list(np.random.default_rng(0).exponential(size=37))
    for q in (0, 50, 90, 99, 100):
        assert bench.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    with pytest.raises(ValueError):
        bench.percentile([], 50)
    for argv in (["--engines", "nope"], ["--precisions", "fp16"], ["--batches", "0"], ["--batches", "x"]):
        with pytest.raises(SystemExit) as exc:
            bench.parse_args(argv)
        assert exc.value.code == 2

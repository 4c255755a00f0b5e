"""GEM's CPU kernels chosen per machine: the choice from given timings, the cache, the setting, and the same
numbers on every path. No test here depends on how fast anything runs."""

from __future__ import annotations

import json
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from open_clip.model import CLIPTextCfg, CLIPVisionCfg  # noqa: E402

from groundlabel.errors import UserError  # noqa: E402
from groundlabel.settings import GEM_CPU_KERNELS, Settings, cache_folder  # noqa: E402
from workers.models.cpu import CpuInfo, parse_cpuinfo  # noqa: E402
from workers.models.gem import GemConfig, GemEngine, kernel_choice, kernels  # noqa: E402
from workers.models.gem.kernel_choice import (  # noqa: E402
    CACHE_FILE,
    choose,
    fastest,
    machine_key,
    medians,
    settled,
    time_paths,
)
from workers.models.gem.modules import DENSE_METHODS, GemVisionTower  # noqa: E402

ONEDNN = torch.backends.mkldnn.is_available()
needs_onednn = pytest.mark.skipif(not ONEDNN, reason="this PyTorch build has no oneDNN")


def tiny_clip(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=24,
        vision_cfg=CLIPVisionCfg(layers=3, width=48, head_width=12, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
    )
    return model.eval()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(autouse=True)
def fresh_choices():
    """Each test starts without the process's remembered choices, and packing on."""
    kernel_choice._memo.clear()
    yield
    kernel_choice._memo.clear()
    kernels.set_weight_packing(True)


class Measure:
    """A stand-in for the timing: given seconds per path, and how often it was asked."""

    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, paths):
        self.calls.append(tuple(paths))
        return {p: self.timings[p] for p in paths}


# ----------------------------------------------------------------------------- the rule
def test_fastest_takes_the_smallest_time_and_plain_torch_within_the_tolerance():
    assert fastest({"packed": 0.5, "onednn": 0.6, "torch": 1.0}) == "packed"
    assert fastest({"packed": 0.7, "onednn": 0.6, "torch": 1.0}) == "onednn"
    assert fastest({"packed": 1.3, "onednn": 1.4, "torch": 1.0}) == "torch"  # the Intel case
    # another path must beat torch by more than the tolerance (3 %): timing noise never picks a slower one
    assert fastest({"packed": 0.98, "onednn": 1.2, "torch": 1.0}) == "torch"
    assert fastest({"packed": 0.96, "onednn": 1.2, "torch": 1.0}) == "packed"
    assert fastest({"packed": 0.9, "torch": 1.0}, tolerance=0.2) == "torch"
    assert fastest({"packed": 0.5, "onednn": 0.5, "torch": 1.0}) == "packed"  # ties: the earlier path
    assert fastest({"packed": 0.5, "onednn": 0.7}) == "packed"  # without torch's time
    with pytest.raises(ValueError):
        fastest({})


def test_fastest_compares_the_paths_within_each_round():
    """Per round, the rounds aligned: packed was slower than torch in two rounds of three, and faster only
    in the one where the machine's load dropped; its median time alone would have picked it."""
    rounds = {"packed": [1.1, 2.2, 0.9], "onednn": [1.2, 2.4, 3.8], "torch": [1.0, 2.0, 4.0]}
    assert fastest(rounds) == "torch"
    assert medians(rounds) == {"packed": 1.1, "onednn": 2.4, "torch": 2.0}
    assert fastest({"packed": [0.5, 2.0, 0.6], "torch": [1.0, 4.5, 1.0]}) == "packed"


def test_time_paths_alternates_the_paths_and_times_each_round():
    """One warm-up per path, then rounds in rotating order; the clock is given, so are the times."""
    seen: list[str] = []
    durations = {
        "packed": [9.0, 1.0, 5.0, 3.0],  # warm-up first
        "onednn": [9.0, 2.0, 2.0, 8.0],
        "torch": [9.0, 4.0, 4.0, 4.0],
    }
    now = [0.0]

    def run():
        path = kernels.current_path()
        seen.append(path)
        now[0] += durations[path].pop(0)

    result = time_paths(run, kernels.PATHS, rounds=3, max_rounds=3, clock=lambda: now[0])
    assert seen[:3] == ["packed", "onednn", "torch"]  # warm-ups, not timed
    assert seen[3:] == ["packed", "onednn", "torch", "onednn", "torch", "packed", "torch", "packed", "onednn"]
    assert result == {"packed": [1.0, 5.0, 3.0], "onednn": [2.0, 2.0, 8.0], "torch": [4.0, 4.0, 4.0]}
    assert kernels.current_path() == "packed"  # the default again after timing


def test_rounds_are_settled_when_every_round_agrees_with_the_choice():
    # torch chosen and never beaten by more than the tolerance: more rounds cannot change it
    assert settled({"packed": [1.3, 1.1, 0.98], "onednn": [1.2, 1.25, 1.3], "torch": [1.0, 1.0, 1.0]})
    # the AVX2 EPYC's disturbed probe: onednn chosen by its median, though slower in one round of three
    probe = {
        "packed": [0.2698, 0.2774, 0.2631],
        "onednn": [0.2984, 0.2725, 0.2662],
        "torch": [0.2475, 0.2864, 0.2867],
    }
    assert fastest(probe) == "onednn" and not settled(probe)
    assert settled({"packed": [0.5, 0.6, 0.55], "onednn": [0.7, 1.4, 0.6], "torch": [1.0, 1.0, 1.0]})
    assert not settled({"packed": [0.5, 0.6, 1.0], "torch": [1.0, 1.0, 1.0]})  # torch as fast once
    assert not settled({"packed": [0.5, 0.6, 0.96], "torch": [1.0, 1.0, 1.0]}, tolerance=0.05)
    assert settled({"packed": [0.5, 0.7]}) and settled({"packed": [0.0], "torch": [0.0]})


def test_time_paths_adds_rounds_until_they_agree_and_stops_at_the_most():
    """The disturbed probe's three rounds, then rounds in which plain PyTorch is clearly faster: timing
    goes on while the rounds disagree, and the choice follows the longer record."""
    now = [0.0]
    extra = {"packed": 0.33, "onednn": 0.32, "torch": 0.24}
    first = {
        "packed": [0.3, 0.2698, 0.2774, 0.2631],
        "onednn": [0.3, 0.2984, 0.2725, 0.2662],
        "torch": [0.3, 0.2475, 0.2864, 0.2867],
    }
    runs = {p: 0 for p in kernels.PATHS}

    def run():
        path = kernels.current_path()
        runs[path] += 1
        now[0] += first[path].pop(0) if first[path] else extra[path]

    result = time_paths(run, kernels.PATHS, clock=lambda: now[0])
    assert 3 < len(result["torch"]) <= kernel_choice.MAX_ROUNDS
    assert {len(ts) for ts in result.values()} == {len(result["torch"])} and fastest(result) == "torch"
    assert settled(result) or len(result["torch"]) == kernel_choice.MAX_ROUNDS
    # rounds that never agree stop at the most
    packed = iter([0.5, 1.5] * 20)  # half or one and a half of torch's time, round after round
    now[0] = 0.0

    def noisy():
        now[0] += next(packed) if kernels.current_path() == "packed" else 1.0

    result = time_paths(noisy, ("packed", "torch"), max_rounds=5, clock=lambda: now[0])
    assert len(result["torch"]) == 5
    # rounds that agree at once stop at the least
    steady = time_paths(
        lambda: None, ("packed", "torch"), max_rounds=7, clock=iter(range(0, 10**6, 1)).__next__
    )
    assert len(steady["torch"]) == kernel_choice.ROUNDS


# ----------------------------------------------------------------------------- choose and keep
def test_the_choice_is_timed_once_kept_in_the_cache_folder_and_read_back(tmp_path):
    tower = GemVisionTower(tiny_clip().visual)
    measure = Measure({"packed": 1.2, "onednn": 1.3, "torch": 1.0})
    choice = choose(tower, "auto", tmp_path, measure=measure, key="cpu A | torch 9")
    assert (choice.path, choice.source) == ("torch", "timed")
    assert choice.timings == {p: measure.timings[p] for p in kernels.available_paths()}
    assert choose(tower, "auto", tmp_path, measure=measure, key="cpu A | torch 9") == choice  # this process
    assert len(measure.calls) == 1
    kept = json.loads((tmp_path / CACHE_FILE).read_text())
    assert kept["choices"]["cpu A | torch 9"]["path"] == "torch"
    assert kept["choices"]["cpu A | torch 9"]["rounds_s"]["torch"] == [1.0]

    kernel_choice._memo.clear()  # another process on the same machine reads the file
    again = choose(tower, "auto", tmp_path, measure=measure, key="cpu A | torch 9")
    assert (again.path, again.source) == ("torch", "cached") and len(measure.calls) == 1
    # another machine (or torch version) times again and keeps both
    fast = Measure({"packed": 0.5, "onednn": 0.6, "torch": 1.0})
    other = choose(tower, "auto", tmp_path, measure=fast, key="cpu B | torch 9")
    assert (other.path, other.source) == ("packed" if ONEDNN else "torch", "timed")
    kept = json.loads((tmp_path / CACHE_FILE).read_text())
    assert set(kept["choices"]) == {"cpu A | torch 9", "cpu B | torch 9"}
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [CACHE_FILE, CACHE_FILE + ".lock"]  # no temporary file left behind


def test_a_process_loading_meanwhile_waits_and_reads_the_first_ones_choice(tmp_path):
    """While another process holds the machine's lock (timing), a load waits, then reads its choice."""
    import fcntl
    import threading

    tower = GemVisionTower(tiny_clip().visual)
    measure = Measure({"packed": 2.0, "onednn": 2.0, "torch": 1.0})
    result = []
    with open(tmp_path / (CACHE_FILE + ".lock"), "a") as other:
        fcntl.flock(other, fcntl.LOCK_EX)
        waiting = threading.Thread(
            target=lambda: result.append(choose(tower, "auto", tmp_path, measure=measure, key="k"))
        )
        waiting.start()
        waiting.join(0.3)
        assert waiting.is_alive() and not result  # blocked on the lock, nothing timed
        kept = {"version": 1, "choices": {"k": {"path": "onednn", "timings_s": {"onednn": 0.5}}}}
        (tmp_path / CACHE_FILE).write_text(json.dumps(kept))
    waiting.join(30)
    assert [(c.path, c.source) for c in result] == [("onednn", "cached")] and measure.calls == []


def test_a_forced_path_is_taken_without_timing_and_a_bad_one_refused(tmp_path):
    tower = GemVisionTower(tiny_clip().visual)
    measure = Measure({"packed": 0.1, "onednn": 0.1, "torch": 1.0})
    for path in kernels.PATHS:
        assert choose(tower, path, tmp_path, measure=measure) == kernel_choice.Choice(path, "forced")
    assert measure.calls == [] and not (tmp_path / CACHE_FILE).exists()
    with pytest.raises(ValueError, match="mkl"):
        choose(tower, "mkl", tmp_path, measure=measure)


def test_an_unreadable_cache_is_timed_again_and_an_unwritable_one_only_warned(tmp_path, caplog):
    tower = GemVisionTower(tiny_clip().visual)
    (tmp_path / CACHE_FILE).write_text("{not json")
    measure = Measure({"packed": 2.0, "onednn": 2.0, "torch": 1.0})
    assert choose(tower, "auto", tmp_path, measure=measure, key="k").source == "timed"
    assert json.loads((tmp_path / CACHE_FILE).read_text())["choices"]["k"]["path"] == "torch"

    kernel_choice._memo.clear()
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with caplog.at_level(logging.WARNING, logger=kernel_choice.__name__):
        choice = choose(tower, "auto", blocked / "cache", measure=measure, key="k")
    assert choice.path == "torch" and "cannot keep the choice" in caplog.text


def test_a_kept_path_this_process_may_not_take_is_timed_again(tmp_path, monkeypatch):
    tower = GemVisionTower(tiny_clip().visual)
    kept = {"version": 1, "choices": {"k": {"path": "packed", "timings_s": {}}}}
    (tmp_path / CACHE_FILE).write_text(json.dumps(kept))
    monkeypatch.setattr(kernels, "available_paths", lambda precision="fp32": ("onednn", "torch"))
    measure = Measure({"onednn": 0.5, "torch": 1.0})
    choice = choose(tower, "auto", tmp_path, measure=measure, key="k")
    assert (choice.path, choice.source) == ("onednn", "timed")


def test_a_single_available_path_is_taken_without_timing(monkeypatch):
    monkeypatch.setattr(kernels, "available_paths", lambda precision="fp32": ("torch",))
    measure = Measure({"torch": 1.0})
    choice = choose(GemVisionTower(tiny_clip().visual), "auto", None, measure=measure)
    assert (choice.path, choice.source, measure.calls) == ("torch", "only", [])


@needs_onednn
def test_available_paths_follow_the_build_and_the_packing_setting(monkeypatch):
    assert kernels.available_paths() == kernels.PATHS
    kernels.set_weight_packing(False)
    assert kernels.available_paths() == ("onednn", "torch")
    monkeypatch.setattr(kernels, "_LINEAR", None)
    assert kernels.available_paths() == ("torch",)


def test_the_key_names_the_cpu_torch_threads_paths_and_the_tower():
    tower = GemVisionTower(tiny_clip().visual, gem_depth=3)
    zen = CpuInfo("AMD EPYC", frozenset({"avx2", "avx512f"}))
    masked = CpuInfo("AMD EPYC", frozenset({"avx2"}))
    base = machine_key(tower, kernels.PATHS, 17, cpu=zen, torch_version="2.9", threads=2)
    assert base.startswith("AMD EPYC [") and "torch 2.9" in base and "threads 2" in base
    assert "packed,onednn,torch" in base and "width 48 blocks 3 heads 4 depth 3 iter 1 tokens 17" in base
    variants = {
        machine_key(tower, kernels.PATHS, 17, cpu=masked, torch_version="2.9", threads=2),
        machine_key(tower, kernels.PATHS, 17, cpu=zen, torch_version="2.10", threads=2),
        machine_key(tower, kernels.PATHS, 17, cpu=zen, torch_version="2.9", threads=1),
        machine_key(tower, ("onednn", "torch"), 17, cpu=zen, torch_version="2.9", threads=2),
        machine_key(tower, kernels.PATHS, 785, cpu=zen, torch_version="2.9", threads=2),
    }
    assert base not in variants and len(variants) == 5


@needs_onednn
def test_packed_copies_made_while_timing_are_freed_when_another_path_wins():
    tower = GemVisionTower(tiny_clip().visual)
    with torch.inference_mode(False), torch.no_grad():
        kernels.linear(torch.randn(2, 48), tower.visual.transformer.resblocks[0].mlp.c_fc.weight)
    assert kernels._packed
    choose(tower, "auto", None, measure=Measure({"packed": 2.0, "onednn": 2.0, "torch": 1.0}), key="k")
    assert not kernels._packed


def test_the_default_timing_runs_a_probe_on_every_path(monkeypatch):
    """Without a given measure, each available path runs the probe (what is timed is not checked)."""
    seen = []

    def spy(run, paths, **kw):
        for path in paths:
            with kernels.using(path):
                assert run() is not None
            seen.append(path)
        return {p: 1.0 for p in paths}

    monkeypatch.setattr(kernel_choice, "time_paths", spy)
    choice = choose(GemVisionTower(tiny_clip().visual), "auto", None, size=(40, 48))
    assert seen == list(kernels.available_paths()) and choice.path == "torch"


# ----------------------------------------------------------------------------- the same numbers everywhere
@needs_onednn
def test_every_path_gives_the_same_tokens_and_the_tower_keeps_its_own():
    model = tiny_clip(3)
    tower = GemVisionTower(model.visual, gem_depth=3, ss_attn_iter=2)
    pixels = torch.randn(2, 3, 40, 56)
    with torch.inference_mode():
        out = {}
        for path in kernels.PATHS:
            with kernels.using(path):
                out[path] = {m: tower.dense_features(pixels, m) for m in DENSE_METHODS}
                out[path]["forward"] = torch.cat(tower(pixels), dim=1)
        for path in ("packed", "onednn"):
            for name, tokens in out[path].items():
                assert rel_diff(tokens, out["torch"][name]) < 1e-5, (path, name)
        calls = []
        real = kernels._LINEAR

        class Spy:
            def __call__(self, *a):
                calls.append("onednn")
                return real(*a)

            def __getattr__(self, name):
                return getattr(real, name)

        kernels._LINEAR = Spy()
        try:
            tower.cpu_kernels = "torch"
            torch_tokens = tower.dense_features(pixels, "gem")
            assert calls == []  # the tower's own path, whatever the caller's
            tower.cpu_kernels = "onednn"
            with kernels.using("torch"):
                assert rel_diff(tower.dense_features(pixels, "gem"), torch_tokens) < 1e-5
            assert calls
        finally:
            kernels._LINEAR = real
    with pytest.raises(ValueError, match="unknown CPU kernel path"), kernels.using("mkl"):
        pass


# ----------------------------------------------------------------------------- engine and settings
def test_the_engine_takes_the_forced_or_the_kept_path_on_the_cpu(tmp_path, monkeypatch):
    forced = GemEngine(GemConfig(pretrained=None, device="cpu", cpu_kernels="onednn"), clip_model=tiny_clip())
    assert forced.tower.cpu_kernels == "onednn" and forced.kernel_choice.source == "forced"

    monkeypatch.setattr(kernel_choice, "time_paths", lambda run, paths, **kw: {p: 1.0 for p in paths})
    config = GemConfig(pretrained=None, device="cpu", image_size=40, kernel_cache=str(tmp_path))
    engine = GemEngine(config, clip_model=tiny_clip())
    assert engine.kernel_choice.source == "timed" and engine.tower.cpu_kernels == "torch"
    (key,) = json.loads((tmp_path / CACHE_FILE).read_text())["choices"]
    assert "tokens 26" in key  # the engine's input (40 pixels, 5 × 5 patches), not the tower's native one
    assert "cpu_kernels" not in config.to_dict() and "kernel_cache" not in config.to_dict()
    assert config.model_version("random") == GemConfig(pretrained=None, image_size=40).model_version("random")
    with pytest.raises(UserError, match="cpu_kernels"):
        GemConfig(cpu_kernels="fast")


def test_the_setting_reaches_the_gem_config_with_the_cache_folder(tmp_path):
    assert ("auto", *kernels.PATHS) == GEM_CPU_KERNELS
    engines = Settings.from_env({"XDG_CACHE_HOME": str(tmp_path)}).engines
    assert engines.gem_cpu_kernels == "auto" and engines.cache_dir == str(tmp_path / "groundlabel")
    options = engines.gem_options()
    assert options["cpu_kernels"] == "auto" and options["kernel_cache"] == str(tmp_path / "groundlabel")
    assert cache_folder({}) == cache_folder({"HOME": "ignored"})  # ~/.cache/groundlabel
    assert str(cache_folder({})).endswith(os.path.join(".cache", "groundlabel"))
    forced = Settings.from_env({"GROUNDLABEL_GEM_CPU_KERNELS": "Torch"}).engines
    assert forced.gem_options()["cpu_kernels"] == "torch"
    with pytest.raises(UserError, match="GROUNDLABEL_GEM_CPU_KERNELS"):
        Settings.from_env({"GROUNDLABEL_GEM_CPU_KERNELS": "mkl"})
    with pytest.raises(UserError, match="GROUNDLABEL_GEM_PACK_WEIGHTS"):
        Settings.from_env({"GROUNDLABEL_GEM_CPU_KERNELS": "packed", "GROUNDLABEL_GEM_PACK_WEIGHTS": "false"})


def test_cpuinfo_gives_the_model_name_flags_and_native_bf16():
    text = (
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\n"
        "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n\nprocessor\t: 1\n"
        "model name\t: other\nflags\t\t: fpu\n"
    )
    cpu = parse_cpuinfo(text)
    assert cpu.model == "Intel(R) Xeon(R) Platinum 8481C" and cpu.native_bf16 and cpu.avx512
    assert cpu.flags == {"fpu", "avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}
    zen_masked = parse_cpuinfo("model name : AMD EPYC\nflags : fpu avx2 fma\n")
    assert not zen_masked.native_bf16 and not zen_masked.avx512
    assert zen_masked.fingerprint() != parse_cpuinfo("model name : AMD EPYC\nflags : avx512f\n").fingerprint()
    assert parse_cpuinfo("").model  # platform's name where /proc/cpuinfo says nothing


# ----------------------------------------------------------------------------- bf16 products
def test_bf16_choices_are_timed_in_bf16_and_kept_apart_from_fp32(tmp_path):
    """The engine in bf16 times the paths with bf16 products (the probe runs under ``using(path, "bf16")``)
    and keeps that choice under a key of its own: an fp32 engine on the same machine is not answered with
    it. Where oneDNN has no bf16 products, plain PyTorch (autocast) is the only path."""
    tower = GemVisionTower(tiny_clip().visual)
    paths = kernels.available_paths("bf16")
    fp32_key, bf16_key = (machine_key(tower, paths, 17, precision=p) for p in ("fp32", "bf16"))
    assert bf16_key == fp32_key + " | bf16"
    seen: list[str] = []

    def measure(ps):
        seen.append(kernels.current_precision())
        return {p: {"packed": 0.5, "onednn": 0.6, "torch": 1.0}[p] for p in ps}

    bf16 = choose(tower, "auto", tmp_path, measure=measure, precision="bf16")
    fp32 = choose(tower, "auto", tmp_path, measure=Measure({"packed": 1.2, "onednn": 1.3, "torch": 1.0}))
    if kernels.ONEDNN_BF16 and len(paths) > 1:
        assert (bf16.path, bf16.source) == ("packed", "timed") and fp32.path == "torch"
        kept = json.loads((tmp_path / CACHE_FILE).read_text())["choices"]
        assert [k.endswith(" | bf16") for k in sorted(kept)] == [False, True]
    else:
        assert bf16 == kernel_choice.Choice("torch", "only") and not seen


def test_time_paths_runs_each_path_with_the_products_it_is_timed_for():
    seen: list[tuple[str, str, bool]] = []

    def run():
        seen.append((kernels.current_path(), kernels.current_precision(), torch.is_autocast_enabled("cpu")))

    paths = kernels.available_paths("bf16")
    time_paths(run, paths, rounds=1, precision="bf16")
    assert {s[1] for s in seen} == {"bf16"}
    assert {(p, a) for p, _, a in seen} == {(p, p == "torch") for p in paths}  # autocast on plain PyTorch
    assert kernels.current_precision() == "fp32" and not torch.is_autocast_enabled("cpu")

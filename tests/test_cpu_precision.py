"""GROUNDLABEL_CPU_PRECISION: the choice from a CPU's flags (never timed), the engines in bf16 on a CPU (their
outputs near fp32's, their names with -bf16, GEM's tower with bf16 operands on oneDNN or under autocast),
the names the backend reads the result cache under, and the tests' own engines staying fp32 on a CPU with
native bf16."""

from __future__ import annotations

import numpy as np
import pytest

from groundlabel.errors import UserError
from groundlabel.settings import Settings
from groundlabel.versions import BF16_SUFFIX, with_precision
from workers.models import cpu
from workers.models.cpu import CpuInfo, cpu_precision, has_native_bf16, parse_cpuinfo

torch = pytest.importorskip("torch")

from conftest import make_tiny_gem_engine, without_native_bf16  # noqa: E402
from PIL import Image  # noqa: E402

from workers.models.device import autocast_context, resolve_precision, version_precision  # noqa: E402

#: Flags as /proc/cpuinfo lists them: a Sapphire Rapids Xeon (AMX and AVX512-BF16), a Zen 4 EPYC
#: (AVX512-BF16), a Zen 3 EPYC and an AVX2-only EPYC VM (neither).
SAPPHIRE_RAPIDS = "fpu sse2 avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8"
ZEN4 = "fpu sse2 avx2 fma avx512f avx512bw avx512_vnni avx512_bf16"
ZEN3 = "fpu sse2 avx2 fma"
AVX2_VM = "fpu sse2 avx avx2 fma f16c"
CPU = torch.device("cpu")


def cpu_of(flags: str) -> CpuInfo:
    return parse_cpuinfo(f"model name : test CPU\nflags : {flags}\n")


def test_auto_is_bf16_only_where_the_cpu_has_it_natively() -> None:
    assert has_native_bf16(SAPPHIRE_RAPIDS.split()) and has_native_bf16(ZEN4.split())
    assert not has_native_bf16(ZEN3.split()) and not has_native_bf16(AVX2_VM.split())
    assert cpu_precision("auto", SAPPHIRE_RAPIDS.split()) == "bf16"
    assert cpu_precision("auto", ["amx_bf16"]) == "bf16"
    assert cpu_precision("auto", ZEN4.split()) == "bf16"
    assert cpu_precision("auto", AVX2_VM.split()) == "fp32"
    assert cpu_precision("auto", ["avx512f", "avx512bw"]) == "fp32"  # AVX-512 alone emulates bf16
    for flags in (SAPPHIRE_RAPIDS, AVX2_VM):
        assert cpu_precision("fp32", flags.split()) == "fp32"
        assert cpu_precision("bf16", flags.split()) == "bf16"
    with pytest.raises(ValueError, match="unknown CPU precision"):
        cpu_precision("fp16", [])


def test_an_engine_resolves_its_precision_by_device_option_and_cpu() -> None:
    spr, vm = cpu_of(SAPPHIRE_RAPIDS), cpu_of(AVX2_VM)
    assert resolve_precision(CPU, "auto", "auto", cpu=spr) == "bf16"
    assert resolve_precision(CPU, "auto", "auto", cpu=vm) == "fp32"
    assert resolve_precision(CPU, "auto", "fp32", cpu=spr) == "fp32"
    assert resolve_precision(CPU, "auto", "bf16", cpu=vm) == "bf16"
    assert resolve_precision(CPU, "fp32", "bf16", cpu=spr) == "fp32"  # an engine's own option wins
    cuda = torch.device("cuda")
    assert resolve_precision(cuda, "auto", "fp32", cpu=vm) == "bf16"  # CUDA: as before, bf16 autocast
    assert resolve_precision(cuda, "auto", "bf16", cuda="fp32", cpu=spr) == "fp32"  # the promptable SAM
    assert version_precision(CPU, "bf16") == "bf16" and version_precision(cuda, "bf16") == "fp32"
    with pytest.raises(UserError, match="precision"):
        resolve_precision(CPU, "fp16")


def test_the_setting_is_read_checked_and_reaches_every_engine() -> None:
    assert Settings.from_env({}).engines.cpu_precision == "auto"
    engines = Settings.from_env({"GROUNDLABEL_CPU_PRECISION": "BF16", "GROUNDLABEL_LAVT_CHECKPOINT": "none",
                                 "GROUNDLABEL_SAM_MODEL": "none"}).engines  # fmt: skip
    assert engines.cpu_precision == "bf16"
    for options in (
        engines.gem_options(),
        engines.lavt_options(),
        engines.sam3_options(),
        engines.sam_options(),
    ):
        assert options["cpu_precision"] == "bf16"
    with pytest.raises(UserError, match="GROUNDLABEL_CPU_PRECISION"):
        Settings.from_env({"GROUNDLABEL_CPU_PRECISION": "fp16"})


def test_version_names_say_bf16_and_the_backend_reads_both_when_it_cannot_know() -> None:
    from workers.engines import all_model_versions, announced_version, cpu_precisions, model_versions

    assert with_precision("gem-x", "fp32") == "gem-x" and with_precision("gem-x", "bf16") == "gem-x-bf16"
    assert with_precision("gem-x-bf16", "bf16") == "gem-x-bf16"
    env = {
        "GROUNDLABEL_GEM_PRETRAINED": "none",
        "GROUNDLABEL_SAM_MODEL": "none",
        "GROUNDLABEL_GEM_REFINE": "sam",
    }
    auto = Settings.from_env({**env, "GROUNDLABEL_CPU_PRECISION": "auto"})
    assert cpu_precisions(auto.engines) == ("fp32", "bf16")  # the workers' CPUs decide
    plain, bf16 = model_versions(auto.engines), model_versions(auto.engines, "bf16")
    assert plain["gem"] == "gem-ViT-B-16-random+sam-random-sam2"
    assert bf16["gem"] == "gem-ViT-B-16-random-bf16+sam-random-sam2-bf16"
    assert bf16["gem_for_lavt"] == "gem-ViT-B-16-random-bf16-expressions+sam-random-sam2-bf16"
    assert bf16["sam"] == "sam-random-sam2-bf16" and bf16["sam3"] == "sam3-bf16"
    assert all_model_versions(auto.engines) == [*plain.values(), *bf16.values()]
    assert announced_version(auto) == plain["gem"]
    fp32 = Settings.from_env({**env, "GROUNDLABEL_CPU_PRECISION": "fp32"})
    assert all_model_versions(fp32.engines) == list(plain.values())
    forced = Settings.from_env({**env, "GROUNDLABEL_CPU_PRECISION": "bf16", "GROUNDLABEL_DEVICE": "cpu"})
    assert all_model_versions(forced.engines) == list(bf16.values())
    assert announced_version(forced) == bf16["gem"]
    gpu = Settings.from_env({**env, "GROUNDLABEL_CPU_PRECISION": "bf16", "GROUNDLABEL_DEVICE": "cuda"})
    assert cpu_precisions(gpu.engines) == ("fp32",)


def test_tests_compute_in_fp32_even_on_a_cpu_with_native_bf16(monkeypatch) -> None:
    """The equivalence tests build engines with ``auto``: on a machine with AMX they still get fp32 (the
    tests' view of the CPU drops its bf16 flags; the workers they start get GROUNDLABEL_CPU_PRECISION=fp32),
    while the same machine outside the tests would take bf16."""
    spr = cpu_of(SAPPHIRE_RAPIDS)
    assert resolve_precision(CPU, "auto", "auto", cpu=spr) == "bf16"
    monkeypatch.setattr(cpu, "machine_cpu", lambda: without_native_bf16(spr))  # as the tests see it
    assert resolve_precision(CPU) == "fp32"
    engine = make_tiny_gem_engine()
    assert engine.precision == "fp32" and not engine.model_version.endswith(BF16_SUFFIX)
    assert engine.kernel_choice is not None and engine.kernel_choice.source != "bf16"
    assert Settings.from_env().engines.cpu_precision == "fp32"  # the tests' environment, for their workers


def _image(seed: int = 0, size: tuple[int, int] = (72, 56)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def test_gem_in_bf16_is_named_so_and_stays_near_fp32(monkeypatch) -> None:
    from workers.models.gem import kernels

    monkeypatch.setattr(cpu, "machine_cpu", lambda: cpu_of(SAPPHIRE_RAPIDS))  # auto on an AMX machine
    bf16 = make_tiny_gem_engine(seed=1)
    fp32 = make_tiny_gem_engine(seed=1, cpu_precision="fp32")
    assert bf16.precision == "bf16" and bf16.model_version == fp32.model_version + BF16_SUFFIX
    assert bf16.kernel_choice is not None and bf16.kernel_choice.path in kernels.available_paths("bf16")
    assert (bf16.tower.cpu_kernels, bf16.tower.cpu_precision) == (bf16.kernel_choice.path, "bf16")
    assert fp32.precision == "fp32" and fp32.kernel_choice is not None and fp32.tower.cpu_precision == "fp32"
    x = torch.ones(2, 2)
    with kernels.using("packed"):
        assert kernels.onednn_usable(x) == (kernels.available_paths() != ("torch",))
        with autocast_context(CPU, "bf16"):
            assert not kernels.onednn_usable(x)  # never fp32 oneDNN products under bf16 autocast
    images, prompts = [_image(0), _image(1, (40, 64))], ["cat", "dog", "car"]
    cos32, cos16 = fp32.cosine_maps(images, prompts), bf16.cosine_maps(images, prompts)
    for a, b in zip(cos32, cos16, strict=True):
        assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
        assert 0 < np.abs(a - b).max() < 0.05  # bf16 ran, and it is near fp32
    for maps in bf16.heatmaps(images, prompts):
        assert maps.dtype == np.float32 and maps.min() >= 0 and maps.max() <= 1


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _gem_tokens(tower, path: str, precision: str, pixels: torch.Tensor) -> torch.Tensor:
    tower.cpu_kernels, tower.cpu_precision = path, precision
    with torch.inference_mode():
        return tower.dense_features(pixels, "gem").float()


def test_gem_tower_with_bf16_operands_on_the_onednn_paths(monkeypatch) -> None:
    """bf16 on the oneDNN paths rounds the products' operands only (packed bf16 weights, bf16 q/k/v and
    probabilities, fp32 in between): the tokens move from fp32 by bf16's rounding, less than under
    autocast, and the same on both oneDNN paths, also with several blocks of query rows per head."""
    from workers.models.gem import kernels

    if not kernels.ONEDNN_BF16:
        pytest.skip("oneDNN has no bf16 products on this CPU (it needs AVX-512 or newer)")
    tower = make_tiny_gem_engine(seed=2, cpu_precision="fp32").tower
    pixels = torch.randn(1, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    reference = _gem_tokens(tower, "torch", "fp32", pixels)
    autocast = _relative(_gem_tokens(tower, "torch", "bf16", pixels), reference)
    kernels.release_packed_weights()
    packed = _gem_tokens(tower, "packed", "bf16", pixels)
    assert {dtype for _, dtype in kernels._packed} == {torch.bfloat16}  # bf16 copies of the weights
    assert 1e-4 < _relative(packed, reference) < min(2e-2, autocast)
    assert _relative(_gem_tokens(tower, "onednn", "bf16", pixels), packed) < 1e-6
    gh, gw = tower.grid_for(64, 48)
    assert 1 + gh * gw > 16
    monkeypatch.setattr(kernels, "_SCORE_BLOCK", 16 * (1 + gh * gw))  # 16-row blocks, keys packed
    blocked = _gem_tokens(tower, "packed", "bf16", pixels)
    assert _relative(blocked, packed) < 1e-2 and _relative(blocked, reference) < 2e-2
    assert kernels.current_precision() == "fp32"  # the tower's setting holds for its own forwards


def test_bf16_without_onednn_bf16_takes_plain_pytorch_under_autocast(monkeypatch) -> None:
    """On a CPU where oneDNN has no bf16 products (AVX2 only), asking a oneDNN path for bf16 gives plain
    PyTorch under autocast, and the choice has that one path."""
    from workers.models.gem import kernels

    monkeypatch.setattr(kernels, "ONEDNN_BF16", False)
    assert kernels.available_paths("bf16") == ("torch",)
    with kernels.using("packed", "bf16"):
        assert kernels.current_path() == "torch" and torch.is_autocast_enabled("cpu")
    with kernels.using("packed", "fp32"):
        assert kernels.current_path() == "packed" and not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="unknown CPU precision"), kernels.using("packed", "fp16"):
        pass


def test_lavt_in_bf16_is_named_so_and_its_probabilities_stay_near_fp32(tmp_path) -> None:
    import copy
    from dataclasses import replace

    from workers.models.lavt import LavtConfig, LavtEngine
    from workers.models.lavt.model import LavtNetwork
    from workers.models.lavt.synthetic import write_vocab
    from workers.models.lavt.text import load_tokenizer

    vocab = write_vocab(tmp_path / "vocab.txt")
    torch.manual_seed(0)
    config = LavtConfig(
        variant="tiny", image_size=64, tokenizer=str(vocab), device="cpu", cpu_precision="bf16"
    )
    net = LavtNetwork(config).eval()
    twin = copy.deepcopy(net)
    twin.config = replace(config, cpu_precision="fp32")
    bf16 = LavtEngine(network=net, tokenizer=load_tokenizer(str(vocab)))
    fp32 = LavtEngine(network=twin, tokenizer=load_tokenizer(str(vocab)))
    assert (bf16.precision, fp32.precision) == ("bf16", "fp32")
    assert bf16.model_version == "lavt-tiny-custom-bf16" and fp32.model_version == "lavt-tiny-custom"
    images, texts = [_image(2), _image(3, (50, 40))], ["the red square", "a blue circle on the left"]
    for (p16, _), (p32, _) in zip(
        bf16.probabilities(images, texts), fp32.probabilities(images, texts), strict=True
    ):
        assert p16.dtype == np.float32 and p16.shape == p32.shape
        assert 0 < np.abs(p16 - p32).max() < 0.05


def test_sam3_in_bf16_is_named_so_and_answers() -> None:
    from sam3_tiny import tiny_sam3_engine

    bf16, fp32 = tiny_sam3_engine(cpu_precision="bf16"), tiny_sam3_engine(cpu_precision="fp32")
    assert (bf16.precision, fp32.precision) == ("bf16", "fp32")
    assert bf16.model_version == "sam3-custom-bf16" and fp32.model_version == "sam3-custom"
    pixels = bf16.preprocess([_image(4)])
    with torch.inference_mode():
        with autocast_context(CPU, bf16.precision):
            v16 = bf16.model.get_vision_features(pixel_values=pixels).fpn_hidden_states[-1]
        v32 = fp32.model.get_vision_features(pixel_values=pixels).fpn_hidden_states[-1]
    assert v16.dtype == torch.bfloat16 and v32.dtype == torch.float32
    assert 0 < _relative(v16, v32) < 0.05
    (found,) = bf16.instances([_image(4)], ["cat", "dog"])
    assert all(i.mask.dtype == bool and 0.0 <= i.score <= 1.0 for i in found)


def test_promptable_sam_encodes_in_bf16_and_decodes_in_fp32() -> None:
    from workers.models.sam import Prompt, SamConfig, SamEngine, family, tiny_config

    torch.manual_seed(0)
    model = family("sam2").model_cls()(tiny_config("sam2", 64))
    engines = {
        p: SamEngine(
            SamConfig(model=None, family="sam2", device="cpu", cpu_precision=p), model=copy_of(model)
        )
        for p in ("bf16", "fp32")
    }
    assert engines["bf16"].model_version == "sam-sam2-custom-bf16"
    assert engines["fp32"].model_version == "sam-sam2-custom"
    image = _image(5, (70, 50))
    e16, e32 = (engines[p].embed(image).tensors for p in ("bf16", "fp32"))
    flat16 = e16 if isinstance(e16, torch.Tensor) else e16[-1]
    flat32 = e32 if isinstance(e32, torch.Tensor) else e32[-1]
    assert flat16.dtype == torch.float32  # kept in fp32 for the fp32 decoder
    assert 0 < _relative(flat16, flat32) < 0.05
    ((masks, scores),) = engines["bf16"].segment(image, [Prompt(points=[(30.0, 20.0)], labels=[1])])
    assert masks.shape == (3, 50, 70) and masks.dtype == bool and scores.dtype == np.float32


def copy_of(module: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(module)

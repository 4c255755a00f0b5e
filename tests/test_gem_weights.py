"""Where GEM's weights come from: random init, local files (TorchScript too), cache folders, errors."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from groundlabel.errors import UserError
from groundlabel.settings import HubSettings, Settings, hub_settings
from workers.models.gem import GemConfig, GemEngine
from workers.models.gem.weights import (
    find_cached_weights,
    is_torchscript,
    load_clip,
    resolve_arch,
    weights_dirs,
)

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

TINY = "gemtest-tiny-vit"


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory):
    """Register a tiny ViT CLIP config with open_clip (its public add_model_config)."""
    folder = tmp_path_factory.mktemp("configs")
    cfg = {
        "embed_dim": 24,
        "vision_cfg": {"image_size": 32, "layers": 3, "width": 48, "head_width": 12, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (folder / f"{TINY}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    return TINY


@pytest.fixture()
def isolated_caches(tmp_path, monkeypatch):
    """No weights from this machine's default caches can leak into a test (``~`` moves into tmp_path)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def offline_hub(tmp_path) -> HubSettings:
    """An offline hub whose cache is an empty folder of the test's."""
    return HubSettings(offline=True, cache=str(tmp_path / "hf"))


def trained_like(arch: str, seed: int = 3):
    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=None).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def same_outputs(a, b) -> bool:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = open_clip.get_tokenizer(TINY)(["a photo of a cat."])
    with torch.no_grad():
        return torch.allclose(a.encode_image(x), b.encode_image(x), atol=1e-5) and torch.allclose(
            a.encode_text(t), b.encode_text(t), atol=1e-5
        )


@pytest.mark.parametrize("pretrained", [None, "", "none", "random"])
def test_random_weights(tiny_arch, pretrained):
    loaded = load_clip(tiny_arch, pretrained)
    assert loaded.weights_label == "random"
    assert loaded.arch == tiny_arch


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
def test_local_file(tiny_arch, tmp_path, suffix):
    src = trained_like(tiny_arch)
    path = tmp_path / f"tiny_weights{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    loaded = load_clip(tiny_arch, str(path))
    assert loaded.weights_label == "tiny_weights"
    assert same_outputs(src, loaded.model)


def test_torchscript_archive_loads_with_quickgelu(tiny_arch, tmp_path):
    torch.manual_seed(4)
    src = open_clip.create_model(tiny_arch, pretrained=None, force_quick_gelu=True).eval()
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.script(src).save(str(path))
    assert is_torchscript(path)
    loaded = load_clip(tiny_arch, str(path))
    act = loaded.model.visual.transformer.resblocks[0].mlp.gelu
    assert type(act).__name__ == "QuickGELU"
    assert same_outputs(src, loaded.model)


def test_wrong_architecture_file_is_a_user_error(tiny_arch, tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"visual.proj": torch.zeros(3, 3)}, str(path))
    with pytest.raises(UserError, match="does not fit the model"):
        load_clip(tiny_arch, str(path))


@pytest.mark.parametrize("name", ["broken.pt", "broken.safetensors"])
def test_corrupt_file_is_a_user_error(tiny_arch, tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(UserError, match="cannot read weight file"):
        load_clip(tiny_arch, str(path))


def test_missing_file_gives_clear_error(tiny_arch, tmp_path):
    missing = tmp_path / "nowhere" / "b16_400m.pt"
    with pytest.raises(UserError, match="not found") as info:
        GemEngine(GemConfig(model_name=tiny_arch, pretrained=str(missing), device="cpu"))
    assert str(missing) in str(info.value)


def test_missing_tag_offline_names_file_folders_and_hub_repo(isolated_caches):
    weights_dir = isolated_caches / "weights"
    settings = Settings.from_env(
        {
            "GROUNDLABEL_WEIGHTS_DIR": str(weights_dir),
            "HF_HUB_OFFLINE": "1",
            "HF_HUB_CACHE": str(isolated_caches / "hf"),
        }
    )
    engines = settings.engines
    with pytest.raises(UserError) as info:
        load_clip("ViT-B/16", "openai", engines.weights_dir, hub=engines.hub)
    msg = str(info.value)
    assert "ViT-B-16-quickgelu" in msg and "'openai'" in msg
    assert "offline" in msg
    assert "ViT-B-16.pt" in msg and "open_clip_model.safetensors" in msg
    assert str(weights_dir) in msg
    assert "GROUNDLABEL_WEIGHTS_DIR" in msg
    assert "timm/vit_base_patch16_clip_224.openai" in msg


def test_unreachable_hub_fails_at_once_with_the_reason(isolated_caches):
    import socket
    import time

    with socket.socket() as probe:  # a loopback port with nothing listening: connections are refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    hub = hub_settings({"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_CACHE": str(isolated_caches)})
    assert not hub.offline
    start = time.monotonic()
    with pytest.raises(UserError, match="Hugging Face hub is unreachable") as info:
        load_clip("ViT-B/16", "openai", hub=hub)
    assert time.monotonic() - start < 10  # no minute of hub client retries
    assert "GROUNDLABEL_WEIGHTS_DIR" in str(info.value)


def test_unknown_model_and_tag(isolated_caches):
    with pytest.raises(UserError, match="unknown open_clip model"):
        load_clip("ViT-Q-99", None)
    with pytest.raises(UserError, match="known tags"):
        load_clip("ViT-B-16", "no_such_tag")


def test_resolve_arch_quickgelu():
    assert resolve_arch("ViT-B-16", "openai")[0] == "ViT-B-16-quickgelu"
    assert resolve_arch("ViT-B-16", "metaclip_400m")[0] == "ViT-B-16-quickgelu"
    assert resolve_arch("ViT-L-14", "openai")[0] == "ViT-L-14-quickgelu"
    assert resolve_arch("ViT-B-32", "laion2b_s34b_b79k")[0] == "ViT-B-32"
    assert resolve_arch("ViT-B-16", "laion2b_s34b_b88k")[0] == "ViT-B-16"
    assert resolve_arch("ViT-B-16-quickgelu", "openai")[0] == "ViT-B-16-quickgelu"


def test_cached_file_layouts(tmp_path):
    cfg = open_clip.get_pretrained_cfg("ViT-B-16", "openai")
    assert find_cached_weights(cfg, [tmp_path]) is None
    snap = tmp_path / "hf" / "models--timm--vit_base_patch16_clip_224.openai" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "open_clip_model.safetensors").write_bytes(b"x")
    assert find_cached_weights(cfg, [tmp_path / "hf"]) == snap / "open_clip_model.safetensors"
    flat = tmp_path / "flat"
    (flat / "timm" / "vit_base_patch16_clip_224.openai").mkdir(parents=True)
    (flat / "timm" / "vit_base_patch16_clip_224.openai" / "open_clip_pytorch_model.bin").write_bytes(b"x")
    assert find_cached_weights(cfg, [flat]).name == "open_clip_pytorch_model.bin"
    (flat / "ViT-B-16.pt").write_bytes(b"x")
    assert find_cached_weights(cfg, [flat]) == flat / "ViT-B-16.pt"


def test_cache_folder_file_is_loaded(tiny_arch, isolated_caches):
    """A tag resolves to a file found in the weights folder (registered here for the tiny architecture)."""
    from open_clip import pretrained as oc_pretrained

    src = trained_like(tiny_arch, seed=8)
    cache = isolated_caches / "weights"
    cache.mkdir()
    save_file(
        {k: v.contiguous() for k, v in src.state_dict().items()}, str(cache / "open_clip_model.safetensors")
    )
    oc_pretrained._PRETRAINED[tiny_arch] = {"tinytag": {"hf_hub": "example/tiny-clip/"}}
    try:
        eng = GemEngine(
            GemConfig(
                model_name=tiny_arch,
                pretrained="tinytag",
                cache_dir=str(cache),
                hub=offline_hub(isolated_caches),
                device="cpu",
            )
        )
    finally:
        oc_pretrained._PRETRAINED.pop(tiny_arch, None)
    assert eng.model_version == f"gem-{tiny_arch}-tinytag"
    assert eng.weights_source == str(cache / "open_clip_model.safetensors")
    assert same_outputs(src, eng.model)


def test_hub_settings_come_from_the_one_settings_reader(tmp_path):
    """The hub's variables are read by the settings, in the hub libraries' order, and reach the search."""
    assert hub_settings({}).offline is False
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "GROUNDLABEL_OFFLINE"):
        assert hub_settings({var: "1"}).offline is True
        assert hub_settings({var: "0"}).offline is False
    assert hub_settings({"HF_HOME": str(tmp_path)}).cache_path == tmp_path / "hub"
    assert hub_settings({"XDG_CACHE_HOME": str(tmp_path)}).cache_path == tmp_path / "huggingface" / "hub"
    both = {"HF_HUB_CACHE": str(tmp_path / "c"), "HF_HOME": str(tmp_path)}
    assert hub_settings(both).cache_path == tmp_path / "c"
    engines = Settings.from_env({"GROUNDLABEL_WEIGHTS_DIR": str(tmp_path / "w"), **both}).engines
    dirs = weights_dirs(engines.weights_dir, engines.hub)
    assert dirs[0] == tmp_path / "w" and dirs[-1] == tmp_path / "c"


def test_tag_found_in_the_hub_cache_named_by_hf_home(tiny_arch, isolated_caches):
    """A tag's file in ``$HF_HOME/hub`` (hub cache layout) loads with no weights folder, offline."""
    from open_clip import pretrained as oc_pretrained

    home = isolated_caches / "hfhome"
    snap = home / "hub" / "models--example--tiny-clip-home" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    src = trained_like(tiny_arch, seed=9)
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(state, str(snap / "open_clip_model.safetensors"))
    oc_pretrained._PRETRAINED[tiny_arch] = {"hometag": {"hf_hub": "example/tiny-clip-home/"}}
    try:
        hub = hub_settings({"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"})
        loaded = load_clip(tiny_arch, "hometag", hub=hub)
    finally:
        oc_pretrained._PRETRAINED.pop(tiny_arch, None)
    assert loaded.source == str(snap / "open_clip_model.safetensors")
    for key, value in src.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value)


def test_gem_config_dict_leaves_out_the_hub_token():
    config = GemConfig(pretrained=None, hub=HubSettings(token="hf_secret"))
    assert "hub" not in config.to_dict() and "hf_secret" not in repr(config)

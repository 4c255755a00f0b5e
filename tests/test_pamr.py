"""PAMR against a plain reference written here (one padded copy per dilation, loops over neighbours),
its sharpening of a blurred mask along an image edge, and its use in the GEM engine."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from workers.models.pamr import pamr, pamr_affinity, refine_scores  # noqa: E402

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def ref_neighbours(x: torch.Tensor, d: int, centre: bool) -> list[torch.Tensor]:
    """The 3×3 neighbourhood of every pixel at dilation ``d`` with replicate padding of exactly ``d``."""
    h, w = x.shape[-2:]
    p = F.pad(x, (d, d, d, d), mode="replicate")
    out = []
    for r in range(3):
        for c in range(3):
            if r == 1 and c == 1 and not centre:
                continue
            out.append(p[..., r * d : r * d + h, c * d : c * d + w])
    return out


def ref_pamr(image: torch.Tensor, masks: torch.Tensor, num_iter: int, dilations) -> torch.Tensor:
    image = image.double()
    masks = F.interpolate(masks.double(), size=image.shape[-2:], mode="bilinear", align_corners=True)
    stack = torch.stack([n for d in dilations for n in ref_neighbours(image, d, True)], dim=2)
    sigma = stack.std(dim=2)  # [B, 3, H, W], over the 9·len(dilations) values
    logits = []
    for d in dilations:
        for nb in ref_neighbours(image, d, False):
            logits.append((-(image - nb).abs() / (1e-8 + 0.1 * sigma)).mean(dim=1))
    logits = torch.stack(logits, dim=1)
    e = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
    weights = e / e.sum(dim=1, keepdim=True)
    for _ in range(num_iter):
        new = torch.zeros_like(masks)
        j = 0
        for d in dilations:
            for nb in ref_neighbours(masks, d, False):
                new = new + weights[:, j : j + 1] * nb
                j += 1
        masks = new
    return masks


@pytest.mark.parametrize("dilations,num_iter", [((1, 2, 4), 3), ((1, 2, 4, 8, 12, 24), 10)])
def test_pamr_matches_reference(dilations, num_iter):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 30, 37, generator=g)
    masks = torch.rand(2, 4, 8, 9, generator=g)
    got = pamr(image, masks, num_iter=num_iter, dilations=dilations)
    want = ref_pamr(image, masks, num_iter, dilations)
    assert got.shape == (2, 4, 30, 37)
    rel = (got.double() - want).abs().max() / want.abs().max()
    assert rel < 1e-4


def test_affinity_is_a_distribution_and_masks_stay_in_range():
    image = torch.rand(1, 3, 16, 20)
    aff = pamr_affinity(image)
    assert aff.shape == (1, 48, 16, 20)
    assert torch.allclose(aff.sum(dim=1), torch.ones(1, 16, 20), atol=1e-5)
    out = pamr(image, torch.rand(1, 3, 16, 20))
    assert out.min() >= 0 and out.max() <= 1


def test_pamr_sharpens_a_blurred_mask_along_an_image_edge():
    h, w, edge = 48, 64, 29
    image = torch.zeros(1, 3, h, w)
    image[..., edge:] = 1.0
    image += 0.02 * torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(1))
    truth = torch.zeros(1, 1, h, w)
    truth[..., edge:] = 1.0
    # A low-resolution, blurred version of the true mask (what a ViT's token grid gives).
    blurred = F.interpolate(F.avg_pool2d(truth, 8), size=(h, w), mode="bilinear", align_corners=False)
    refined = pamr(image, blurred)
    err_before = (blurred - truth).abs().mean().item()
    err_after = (refined - truth).abs().mean().item()
    assert err_after < 0.5 * err_before
    # The step across the edge is steeper after refinement.
    row = h // 2
    assert (refined[0, 0, row, edge] - refined[0, 0, row, edge - 1]) > 2 * (
        blurred[0, 0, row, edge] - blurred[0, 0, row, edge - 1]
    )


def test_pamr_errors_and_identity():
    with pytest.raises(ValueError, match="same B"):
        pamr(torch.rand(1, 3, 8, 8), torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="dilations"):
        pamr(torch.rand(1, 3, 8, 8), torch.rand(1, 1, 8, 8), dilations=(0,))
    m = torch.rand(1, 2, 8, 8)
    assert torch.equal(pamr(torch.rand(1, 3, 8, 8), m, num_iter=0), m)


def test_refine_scores_works_at_a_quarter_of_the_image():
    rgb = torch.rand(3, 100, 80)
    out = refine_scores(rgb, torch.rand(2, 7, 5))
    assert out.shape == (2, 25, 20)
    small = refine_scores(torch.rand(3, 12, 12), torch.rand(1, 7, 7))
    assert small.shape == (1, 7, 7)  # never below the score grid


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pamr_cuda_matches_cpu():
    image, masks = torch.rand(2, 3, 40, 50), torch.rand(2, 3, 10, 12)
    cpu = pamr(image, masks)
    gpu = pamr(image.cuda(), masks.cuda()).cpu()
    assert (cpu - gpu).abs().max() < 1e-4


def tiny_engine(**overrides):
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    from tests.conftest import TINY_GEM_CONFIG
    from workers.models.gem import GemConfig, GemEngine

    torch.manual_seed(3)
    model = open_clip.CLIP(
        embed_dim=TINY_GEM_CONFIG["embed_dim"],
        vision_cfg=CLIPVisionCfg(**TINY_GEM_CONFIG["vision_cfg"]),
        text_cfg=CLIPTextCfg(**TINY_GEM_CONFIG["text_cfg"]),
    ).eval()
    config = GemConfig(model_name="tinyclip", pretrained=None, image_size=64, device="cpu", **overrides)
    return GemEngine(config, clip_model=model)


def test_engine_refine_pamr():
    from groundlabel.errors import UserError
    from workers.models.gem import GemConfig

    plain, refined = tiny_engine(), tiny_engine(refine="pamr")
    rng = np.random.default_rng(0)
    arr = np.zeros((70, 90, 3), np.uint8)
    arr[:, 45:] = 255
    arr = np.clip(arr.astype(int) + rng.integers(-10, 10, arr.shape), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr)
    a = plain.heatmaps([im], ["cat", "dog"])[0]
    b = refined.heatmaps([im, im], ["cat", "dog"])
    assert a.shape == b[0].shape == (2, 70, 90)
    assert b[0].min() >= 0 and b[0].max() <= 1
    assert not np.allclose(a, b[0])
    np.testing.assert_allclose(b[0], b[1], atol=1e-6)
    assert refined.model_version.endswith("-pamr") and not plain.model_version.endswith("-pamr")
    assert GemConfig(pamr=True).refine == "pamr"
    with pytest.raises(UserError, match="refine"):
        GemConfig(refine="crf")


def test_worker_setting_and_cli_flag():
    from groundlabel.settings import Settings
    from groundlabel_cli.main import build_parser
    from workers.engines import gem_config

    assert gem_config(Settings.from_env({"GROUNDLABEL_GEM_REFINE": "pamr"}).engines).refine == "pamr"
    assert gem_config(Settings.from_env({}).engines).refine == "none"
    args = build_parser().parse_args(["predict", "a.png", "--labels", "cat", "--refine", "pamr"])
    assert args.refine == "pamr"

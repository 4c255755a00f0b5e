"""``groundlabel distill`` on generated scenes with a tiny CLIP: the loss falls, the checkpoint loads into
GemEngine, and the CLIPSelf pieces (grid boxes, RoIAlign pooling) behave."""

from __future__ import annotations

import json
import os
import random
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from groundlabel_cli.main import main  # noqa: E402
from tests.conftest import TINY_GEM_CONFIG  # noqa: E402
from workers.models.clipself.distill import dense_map, grid_boxes  # noqa: E402

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def test_grid_boxes_follow_clipself_rule():
    rng = random.Random(0)
    for _ in range(200):
        boxes = grid_boxes(rng, 90, 60, max_split=6, max_boxes=20)
        assert 1 <= len(boxes) <= 20
        assert (
            (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 90 + 1e-4).all() and (boxes[:, 3] <= 60 + 1e-4).all()
        )
        widths = np.unique(np.round(boxes[:, 2] - boxes[:, 0], 3))
        heights = np.unique(np.round(boxes[:, 3] - boxes[:, 1], 3))
        cols, rows = round(90 / widths[0]), round(60 / heights[0])

        def ok(m: int, n: int) -> bool:
            return 1 <= m <= 6 and -(-m // 2) <= n <= min(2 * m, 6)

        assert ok(rows, cols) or ok(cols, rows), (rows, cols)
        assert len(boxes) == min(20, rows * cols)


def test_dense_map_is_unit_norm_and_pooling_matches_a_cell_mean():
    from torchvision.ops import roi_align

    from tests.test_gem_modules import tiny_clip

    model = tiny_clip(0, layers=2)
    dense = dense_map(model, torch.randn(1, 3, 32, 48))
    assert dense.shape == (1, 24, 4, 6)
    torch.testing.assert_close(dense.norm(dim=1), torch.ones(1, 4, 6))
    # A box covering exactly grid cells 1..2 × 0..1 (in pixels of the 8-px patches) pools their mean.
    pooled = roi_align(dense, torch.tensor([[0, 8.0, 0.0, 24.0, 16.0]]), (1, 1), 1 / 8, -1, True)
    torch.testing.assert_close(
        pooled[0, :, 0, 0], dense[0, :, 0:2, 1:3].mean(dim=(1, 2)), atol=1e-5, rtol=1e-4
    )


@pytest.fixture()
def scene_dir(tmp_path):
    from workers.evaluation.scenes import make_scenes

    folder = tmp_path / "images"
    folder.mkdir()
    for i, scene in enumerate(make_scenes(12, seed=5, size=64)):
        scene.image.save(folder / f"scene_{i:02d}.png")
    return folder


def test_distill_cli_loss_falls_and_checkpoint_loads_into_gem(tmp_path, scene_dir, capsys):
    from workers.models.gem import GemConfig, GemEngine

    cfg_path = tmp_path / "tinyclip.json"
    cfg_path.write_text(json.dumps(TINY_GEM_CONFIG))
    out = tmp_path / "distilled.pt"
    rc = main(
        [
            "distill",
            str(scene_dir),
            "--out",
            str(out),
            "--model-config",
            str(cfg_path),
            "--pretrained",
            "none",
            "--steps",
            "40",
            "--lr",
            "2e-3",
            "--image-size",
            "64",
            "--crop-size",
            "32",
            "--batch-size",
            "2",
            "--max-split",
            "3",
            "--device",
            "cpu",
            "--no-progress",
            "--ensemble-alpha",
            "1.0",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    first, last = (float(x) for x in re.search(r"loss ([\d.]+) .*-> ([\d.]+)", text).groups())
    assert last < 0.7 * first, text
    state = torch.load(out, weights_only=True)
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in state
    engine = GemEngine(GemConfig(model_name="tinyclip", pretrained=str(out), image_size=64, device="cpu"))
    assert engine.model_version == "gem-tinyclip-distilled-64"
    torch.testing.assert_close(engine.model.state_dict()["visual.proj"], state["visual.proj"])
    from PIL import Image

    maps = engine.heatmaps([Image.open(next(scene_dir.iterdir())).convert("RGB")], ["circle"])
    assert maps[0].shape == (1, 64, 64)


def test_distill_cli_errors(tmp_path):
    assert main(["distill", str(tmp_path / "missing"), "--out", str(tmp_path / "x.pt")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["distill", str(tmp_path / "empty"), "--out", str(tmp_path / "x.pt")]) == 2

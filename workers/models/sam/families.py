"""The promptable Segment Anything families that ``transformers`` ships, and their tiny test sizes.

Each :class:`Family` names its model and config classes, how images are fed to it (``pad``: longest side
resized to the input size and padded at the bottom/right, as SAM and SAM-HQ were trained; ``square``:
resized to a square ignoring the aspect ratio, as SAM 2, EdgeTAM and the SAM 3 tracker were trained), its
normalisation, and its published hub ids. No torch import here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from groundlabel.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Family:
    """One promptable SAM-family architecture in ``transformers``."""

    name: str  # groundlabel's name (GROUNDLABEL_SAM_FAMILY)
    model_class: str
    config_class: str
    model_types: tuple[str, ...]  # config.json model_type values
    resize: str  # "pad" or "square"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    hub_ids: tuple[str, ...]  # published checkpoints, smallest first
    gated: bool = False

    def model_cls(self) -> Any:
        """The ``transformers`` model class."""
        import transformers

        return getattr(transformers, self.model_class)

    def config_cls(self) -> Any:
        """The ``transformers`` config class."""
        import transformers

        return getattr(transformers, self.config_class)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "sam3_tracker", "Sam3TrackerModel", "Sam3TrackerConfig", ("sam3_tracker", "sam3"), "square",
            HALF, HALF, ("facebook/sam3",), gated=True,
        ),
        Family(
            "sam2", "Sam2Model", "Sam2Config", ("sam2",), "square", IMAGENET_MEAN, IMAGENET_STD,
            ("facebook/sam2.1-hiera-tiny", "facebook/sam2.1-hiera-small", "facebook/sam2.1-hiera-base-plus",
             "facebook/sam2.1-hiera-large"),
        ),
        Family(
            "sam", "SamModel", "SamConfig", ("sam",), "pad", IMAGENET_MEAN, IMAGENET_STD,
            ("facebook/sam-vit-base", "facebook/sam-vit-large", "facebook/sam-vit-huge"),
        ),
        Family(
            "sam_hq", "SamHQModel", "SamHQConfig", ("sam_hq",), "pad", IMAGENET_MEAN, IMAGENET_STD,
            ("syscv-community/sam-hq-vit-base", "syscv-community/sam-hq-vit-large",
             "syscv-community/sam-hq-vit-huge"),
        ),
        Family(
            "edgetam", "EdgeTamModel", "EdgeTamConfig", ("edgetam",), "square", IMAGENET_MEAN, IMAGENET_STD,
            ("yonigozlan/EdgeTAM-hf",),
        ),
    )
}  # fmt: skip


def family(name: str) -> Family:
    """The family called ``name`` (``sam2.1`` and ``sam2`` are one); a clear error otherwise."""
    key = name.strip().lower().replace("-", "_").replace(".", "")
    key = {"sam21": "sam2", "samhq": "sam_hq", "sam3": "sam3_tracker", "sam3tracker": "sam3_tracker"}.get(
        key, key
    )
    if key not in FAMILIES:
        raise UserError(f"unknown SAM family {name!r}; expected one of {', '.join(FAMILIES)}")
    return FAMILIES[key]


def family_of_model_type(model_type: str) -> Family | None:
    """The family whose checkpoints have this ``config.json`` model_type."""
    for f in FAMILIES.values():
        if model_type in f.model_types:
            return f
    return None


def guess_family(source: str) -> Family | None:
    """The family a hub id or folder name suggests (``sam2.1-hiera-tiny`` → sam2), or None."""
    text = source.lower().replace("_", "-")
    for f in FAMILIES.values():
        if source in f.hub_ids:
            return f
    needles = (("edgetam", "edgetam"), ("sam-hq", "sam_hq"), ("samhq", "sam_hq"), ("sam3", "sam3_tracker"),
               ("sam2", "sam2"), ("sam", "sam"))  # fmt: skip
    for needle, name in needles:
        if needle in text:
            return FAMILIES[name]
    return None


def edgetam_backbone() -> Any:
    """EdgeTAM's RepViT-M1 image encoder (timm, random weights): the config class's own default names
    its architecture under a misspelt key, which gives a ResNet-50 instead."""
    from transformers import TimmWrapperConfig

    return TimmWrapperConfig(
        architecture="repvit_m1",
        model_args={"in_chans": 3, "features_only": True, "out_indices": [0, 1, 2, 3]},
    )


def real_config(name: str) -> Any:
    """The published architecture's config with random weights: each family's default config is its
    smallest published model (SAM ViT-B, SAM-HQ ViT-B, SAM 2.1 Hiera-T, EdgeTAM, the SAM 3 tracker)."""
    f = family(name)
    if f.name == "edgetam":
        import transformers as t

        return t.EdgeTamConfig(vision_config=t.EdgeTamVisionConfig(backbone_config=edgetam_backbone()))
    config = f.config_cls()()
    if f.name in ("sam", "sam_hq"):
        # their vision config initialises weights at std 1e-10: random weights that small run on
        # denormal floats, many times slower on CPUs than trained weights
        config.vision_config.initializer_range = 0.02
    return config


def tiny_config(name: str, image_size: int = 64) -> Any:
    """A tiny random-weight config of the family (for tests: a few hundred thousand parameters)."""
    import transformers as t

    f = family(name)
    if f.name in ("sam", "sam_hq"):
        prefix = "SamHQ" if f.name == "sam_hq" else "Sam"
        vision = getattr(t, f"{prefix}VisionConfig")(
            hidden_size=32,
            output_channels=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=8,
            window_size=4,
            global_attn_indexes=[1],
            num_pos_feats=16,
            mlp_dim=64,
            initializer_range=0.02,
        )
        prompt = getattr(t, f"{prefix}PromptEncoderConfig")(
            hidden_size=32, image_size=image_size, patch_size=8
        )
        decoder_options: dict[str, Any] = {"vit_dim": 32} if f.name == "sam_hq" else {}
        decoder = getattr(t, f"{prefix}MaskDecoderConfig")(
            hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32, **decoder_options
        )
        return f.config_cls()(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
    grid = [
        [image_size // 4, image_size // 4],
        [image_size // 8, image_size // 8],
        [image_size // 16, image_size // 16],
    ]
    if f.name == "sam2":
        backbone = t.Sam2HieraDetConfig(
            hidden_size=12,
            embed_dim_per_stage=[12, 24, 48, 96],
            num_attention_heads_per_stage=[1, 2, 4, 8],
            blocks_per_stage=[1, 1, 2, 1],
            image_size=image_size,
        )
        vision = t.Sam2VisionConfig(
            backbone_config=backbone,
            backbone_channel_list=[96, 48, 24, 12],
            backbone_feature_sizes=grid,
            fpn_hidden_size=32,
        )
    elif f.name == "edgetam":
        vision = t.EdgeTamVisionConfig(
            backbone_config=edgetam_backbone(), backbone_feature_sizes=grid, fpn_hidden_size=32
        )
    else:
        backbone = t.Sam3ViTConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=4,
            window_size=4,
            global_attn_indexes=[1],
            pretrain_image_size=16,
        )
        grid = [
            [image_size, image_size],
            [image_size // 2, image_size // 2],
            [image_size // 4, image_size // 4],
        ]
        vision = t.Sam3VisionConfig(backbone_config=backbone, fpn_hidden_size=32, backbone_feature_sizes=grid)
    prefix = {"sam2": "Sam2", "edgetam": "EdgeTam", "sam3_tracker": "Sam3Tracker"}[f.name]
    patch = 4 if f.name == "sam3_tracker" else 16
    prompt = getattr(t, f"{prefix}PromptEncoderConfig")(
        hidden_size=32, image_size=image_size, patch_size=patch
    )
    decoder = getattr(t, f"{prefix}MaskDecoderConfig")(
        hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32
    )
    return f.config_cls()(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)

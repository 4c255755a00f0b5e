"""A tiny random SAM 3 configuration, for the tests and quick benchmark runs (no download).

Sizes from ``transformers``' own SAM 3 test suite (32 wide, one or two layers, 224-pixel input, a few
queries); the text tower keeps CLIP's 49408-token vocabulary so that the real tokenizer
(:func:`~workers.models.sam3.processor.clip_tokenizer`) fits.
"""

from __future__ import annotations

from typing import Any

TINY_IMAGE_SIZE = 224
TINY_QUERIES = 5


def tiny_sam3_model(seed: int = 0, queries: int = TINY_QUERIES) -> Any:
    """A random ``Sam3Model`` small enough for a unit test (about 2 M parameters)."""
    import torch
    from transformers import Sam3Config, Sam3Model
    from transformers.models.sam3.configuration_sam3 import (
        Sam3DETRDecoderConfig,
        Sam3DETREncoderConfig,
        Sam3GeometryEncoderConfig,
        Sam3MaskDecoderConfig,
        Sam3VisionConfig,
        Sam3ViTConfig,
    )

    backbone = Sam3ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        image_size=TINY_IMAGE_SIZE, patch_size=14, window_size=8, global_attn_indexes=[0, 1],
    )  # fmt: skip
    config = Sam3Config(
        vision_config=Sam3VisionConfig(
            backbone_config=backbone, fpn_hidden_size=32, scale_factors=[4.0, 2.0, 1.0, 0.5]
        ),
        text_config={
            "vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 32,
            "hidden_act": "gelu",
        },  # fmt: skip
        geometry_encoder_config=Sam3GeometryEncoderConfig(
            hidden_size=32, num_layers=1, num_attention_heads=4, intermediate_size=64
        ),
        detr_encoder_config=Sam3DETREncoderConfig(
            hidden_size=32, num_layers=1, num_attention_heads=4, intermediate_size=64
        ),
        detr_decoder_config=Sam3DETRDecoderConfig(
            hidden_size=32, num_layers=1, num_queries=queries, num_attention_heads=4, intermediate_size=64
        ),
        mask_decoder_config=Sam3MaskDecoderConfig(hidden_size=32, num_upsampling_stages=3),
    )
    torch.manual_seed(seed)
    return Sam3Model(config).eval()

"""The LAVT network: ``LAVT`` (backbone + decoder, the checkpoint's ``model`` entry) and BERT (its
``bert_model`` entry), wrapped together in :class:`LavtNetwork` for training and inference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.models.lavt.backbone import MultiModalSwinTransformer
from workers.models.lavt.config import LavtConfig
from workers.models.lavt.decoder import SimpleDecoding

#: ImageNet normalisation LAVT applies after resizing to 480×480.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


class LAVT(nn.Module):
    """Backbone with language fusion and the simple decoder; BERT features come from outside."""

    def __init__(self, config: LavtConfig) -> None:
        super().__init__()
        self.backbone = MultiModalSwinTransformer(
            embed_dim=config.embed_dim,
            depths=config.depths,
            num_heads=config.num_heads,
            window_size=config.window_size,
            patch_size=config.patch_size,
            mlp_ratio=config.mlp_ratio,
            drop_path_rate=config.drop_path_rate,
            l_in=config.text_dim,
            fusion_heads=config.fusion_heads,
        )
        self.classifier = SimpleDecoding(8 * config.embed_dim)

    def forward(
        self, image: torch.Tensor, lang: torch.Tensor, lang_mask: torch.Tensor, upsample: bool = True
    ) -> torch.Tensor:
        """``image`` [B,3,H,W], ``lang`` [B,C_text,N], ``lang_mask`` [B,N,1] → logits [B,2,H,W]
        (or at 1/4 resolution with ``upsample=False``)."""
        c1, c2, c3, c4 = self.backbone(image, lang, lang_mask)
        logits = self.classifier(c4, c3, c2, c1)
        if upsample:
            logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=True)
        return logits


def build_bert(config: LavtConfig) -> nn.Module:
    """A pooler-less ``BertModel`` with random weights (bert-base-uncased shape unless configured)."""
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(**(config.bert_config or {})), add_pooling_layer=False)
    bert.eval()
    return bert


class LavtNetwork(nn.Module):
    """``model`` (LAVT) + ``bert_model`` (text encoder), the two entries of a LAVT checkpoint."""

    def __init__(self, config: LavtConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LAVT(config)
        self.bert_model = build_bert(config)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """BERT's last hidden state, channels first: [B, C_text, N]."""
        hidden = self.bert_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden.permute(0, 2, 1)

    def forward(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        upsample: bool = True,
    ) -> torch.Tensor:
        lang = self.encode_text(input_ids, attention_mask)
        return self.model(image, lang, attention_mask.unsqueeze(-1), upsample=upsample)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (for logs and the benchmark)."""
    return sum(p.numel() for p in module.parameters())

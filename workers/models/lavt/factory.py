"""Building a LAVT network from a config and, optionally, a checkpoint file."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from workers.models.lavt.config import LavtConfig
from workers.models.lavt.model import LavtNetwork
from workers.models.lavt.weights import load_network_state, read_checkpoint, split_checkpoint

log = logging.getLogger(__name__)

#: LavtConfig fields that are run-time options, not architecture: the caller's values win over a file's.
RUNTIME_FIELDS = ("device", "batch_size", "precision", "cpu_precision", "tokenizer", "cache_dir")


def load_network(
    checkpoint: str | Path | None = None,
    config: LavtConfig | None = None,
) -> tuple[LavtNetwork, dict[str, Any]]:
    """``(network, extras)``. Without a checkpoint the weights are random.

    Our checkpoints carry their architecture (``config``), which wins over ``config``'s architecture
    fields; official checkpoints carry none, so ``config`` (default: Swin-B, window 12) must match them,
    and a mismatch is reported with the option to change.
    """
    if checkpoint is None:
        return LavtNetwork(config or LavtConfig()), {}
    model_state, bert_state, extras = split_checkpoint(read_checkpoint(checkpoint))
    if isinstance(extras.get("config"), dict):
        runtime = {name: getattr(config, name) for name in RUNTIME_FIELDS} if config else {}
        config = LavtConfig.from_dict(extras["config"], **runtime)
    config = config or LavtConfig()
    net = LavtNetwork(config)
    load_network_state(net, model_state, bert_state)
    log.info("LAVT %s loaded from %s", config.variant, checkpoint)
    return net, extras

"""SAM 3's processor (image resizing and normalisation, CLIP tokenizer) when no hub files are at hand.

SAM 3's tokenizer is CLIP's byte-level BPE (49408 tokens, ``<|startoftext|>`` 49406, ``<|endoftext|>``
49407, padded to 32 tokens). open_clip ships the same vocabulary, so random-weight models (tests,
benchmarks, protocol trials) get the real tokenizer without a download.
"""

from __future__ import annotations

import functools
import gzip
from typing import Any

#: SAM 3's text length: prompts are padded (and cut) to this many tokens.
MAX_TEXT_TOKENS = 32


@functools.lru_cache(maxsize=1)
def _clip_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe()) as fh:
        lines = fh.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab)}, merges  # type: ignore[return-value]


def clip_tokenizer() -> Any:
    """CLIP's tokenizer as a ``transformers`` ``CLIPTokenizer``, built from open_clip's vocabulary."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocabulary()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges))


def default_processor(image_size: int) -> Any:
    """A ``Sam3Processor`` for a model whose input is ``image_size`` pixels square (1008 for SAM 3)."""
    from transformers import Sam3Processor
    from transformers.models.sam3.image_processing_sam3 import Sam3ImageProcessor

    size = int(image_size)
    mask = max(1, size * 2 // 7)  # the mask decoder's output: 288 for 1008
    image_processor = Sam3ImageProcessor(
        size={"height": size, "width": size}, mask_size={"height": mask, "width": mask}
    )
    return Sam3Processor(image_processor=image_processor, tokenizer=clip_tokenizer())

"""Tokenisation as LAVT does it: BERT WordPiece, ``encode(raw, add_special_tokens=True)[:20]``, zero
padding, attention mask 1 on the real tokens.

Long expressions are truncated (the ``[SEP]`` may be cut off, as in LAVT) and reported in the meta, never
refused."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from groundlabel.errors import UserError
from workers.models.lavt.config import DEFAULT_BERT


def load_tokenizer(
    source: str | None = None,
    *,
    vocab: Sequence[str] | None = None,
    lowercase: bool = True,
    cache_dir: str | None = None,
) -> Any:
    """A BERT tokenizer from a ``vocab.txt`` file, a folder holding one, a vocabulary list (as our
    checkpoints store it), or a hub name found in the Hugging Face cache (downloaded when online)."""
    from transformers import BertTokenizerFast

    if source is None and vocab is not None:
        return BertTokenizerFast(vocab={tok: i for i, tok in enumerate(vocab)}, do_lower_case=lowercase)
    source = source or DEFAULT_BERT
    path = Path(source).expanduser()
    if path.is_file():
        return BertTokenizerFast(vocab=str(path), do_lower_case=lowercase)
    if path.is_dir():
        if not (path / "vocab.txt").is_file() and not (path / "tokenizer.json").is_file():
            raise UserError(f"tokenizer folder {path} has neither vocab.txt nor tokenizer.json")
        return BertTokenizerFast.from_pretrained(str(path))
    if source.startswith((".", "/", "~")) or source.endswith(".txt") or source.count("/") > 1:
        raise UserError(f"tokenizer path {source} does not exist")
    try:
        tokenizer = BertTokenizerFast.from_pretrained(source, cache_dir=cache_dir)
        # transformers 5 returns an empty tokenizer (special tokens only) when it finds no files.
        if len(tokenizer.get_vocab()) <= len(tokenizer.all_special_tokens):
            raise OSError("no vocabulary files found")
        return tokenizer
    except (OSError, ValueError) as exc:
        raise UserError(
            f"the BERT tokenizer {source!r} is neither in the Hugging Face cache nor reachable ({exc}); "
            "pass a folder or vocab.txt file (the tokenizer option / GROUNDLABEL_LAVT_TOKENIZER), "
            "or fetch it once on a machine that is online"
        ) from exc


def tokenizer_vocab(tokenizer: Any) -> list[str]:
    """The vocabulary in id order (stored in our checkpoints so they carry their tokenizer)."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return [tok for tok, _ in items]


def tokenize(
    tokenizer: Any,
    expressions: Sequence[str],
    max_tokens: int = 20,
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
    """``(input_ids [B, max_tokens], attention_mask [B, max_tokens], metas)``.

    Each meta is ``{"tokens": N, "truncated": bool}`` where N counts the tokens with ``[CLS]`` and
    ``[SEP]`` before truncation to ``max_tokens``.
    """
    ids = torch.zeros((len(expressions), max_tokens), dtype=torch.long)
    mask = torch.zeros((len(expressions), max_tokens), dtype=torch.long)
    metas: list[dict[str, Any]] = []
    for i, text in enumerate(expressions):
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"referring expression {i} is empty")
        encoded = tokenizer.encode(text, add_special_tokens=True)
        kept = encoded[:max_tokens]
        ids[i, : len(kept)] = torch.tensor(kept, dtype=torch.long)
        mask[i, : len(kept)] = 1
        metas.append({"tokens": len(encoded), "truncated": len(encoded) > max_tokens})
    return ids, mask, metas

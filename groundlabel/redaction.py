"""Secret redaction in text and in log records, for every groundlabel process."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

REDACTED = "***"

# Credentials that appear in text even when their value is not known to this process.
_PATTERNS = [
    re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?(?:basic|bearer|token)\s+)[^\s\"',}]+"),
    re.compile(r"(?i)\b((?:basic|bearer|token)\s+)[A-Za-z0-9+/=._\-]{12,}"),
    # A field name, not a word inside a path or a file name (``/etc/passwd: ...`` keeps its message).
    re.compile(
        r"(?i)((?<![\w/\\])[\"']?\b(?:password|passwd|access_token|api_key|apikey|token|secret)[\"']?"
        r"\s*[:=]\s*[\"']?)[^\s\"',}&]+"
    ),
    re.compile(r"(?i)((?:https?|redis|rediss)://[^:/@\s]*:)[^@\s]+(@)"),
]


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with known secret values and credential-looking fields replaced by ``***``."""
    for secret in sorted((s for s in secrets if s and len(s) >= 3), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    for pattern in _PATTERNS:
        if pattern.groups >= 2:
            text = pattern.sub(lambda m: m.group(1) + REDACTED + m.group(2), text)
        else:
            text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
    return text


class RedactingFilter(logging.Filter):
    """A logging filter that rewrites each record's message so that it holds no secret."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler to report
            return True
        clean = redact(message, self.secrets)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        if clean != message:
            self._redact_record(record, clean)
        return True

    def _redact_record(self, record: logging.LogRecord, clean: str) -> None:
        # Keep the record's (msg, args) shape where redacting the arguments is enough: formatters such as
        # uvicorn's access log unpack record.args. Otherwise replace the message by its redacted text.
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(redact(a, self.secrets) if isinstance(a, str) else a for a in record.args)
            try:
                if record.getMessage() == clean:
                    return
            except Exception:
                pass
        record.msg, record.args = clean, None


def install_log_redaction(secrets: Iterable[str] = ()) -> RedactingFilter:
    """Attach one redacting filter to every handler of the root logger and of uvicorn's loggers."""
    flt = RedactingFilter(secrets)
    names = ["", "uvicorn", "uvicorn.error", "uvicorn.access", "rq.worker", "rq"]
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(flt)
        for handler in logger.handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(flt)
    return flt

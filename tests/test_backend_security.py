"""Secrets stay out of logs; settings are read from the environment with clear errors."""

from __future__ import annotations

import base64
import logging

import pytest

from groundlabel.errors import UserError
from groundlabel.redaction import RedactingFilter, install_log_redaction, redact
from groundlabel.settings import Settings
from labeling_backend.auth import check_authorization
from workers.engines import announced_version


def test_redact_known_secrets_and_credential_patterns():
    text = (
        "Authorization: Token abcdef0123456789abcdef key=LS-SECRET-KEY password=hunter2x "
        "url=redis://user:redispw@host:6379/0 header {'authorization': 'Bearer eyJhbGciOiJIUzI1NiJ9.x.y'}"
    )
    out = redact(text, ["LS-SECRET-KEY"])
    for secret in ("abcdef0123456789abcdef", "LS-SECRET-KEY", "hunter2x", "redispw", "eyJhbGciOiJIUzI1NiJ9"):
        assert secret not in out
    assert "redis://user:***@host:6379/0" in out
    assert redact("the API is open") == "the API is open"


def test_redaction_keeps_words_around_paths_and_redacts_only_values():
    """A secret-looking word inside a path is no field name: the error message keeps its words."""
    assert redact("file:///etc/passwd: unsupported image URL") == "file:///etc/passwd: unsupported image URL"
    assert redact("cannot read /run/secrets/token: not found") == "cannot read /run/secrets/token: not found"
    assert redact("C:\\keys\\secret=1 missing") == "C:\\keys\\secret=1 missing"
    assert redact("password=hunter2 was refused") == "password=*** was refused"
    assert redact("GET /img?token=abc123&x=1 failed") == "GET /img?token=***&x=1 failed"
    assert redact('{"api_key": "k-1", "n": 2}') == '{"api_key": "***", "n": 2}'


def test_logging_filter_removes_secrets_from_messages_args_and_tracebacks(caplog):
    settings = Settings.from_env(
        {
            "LABEL_STUDIO_API_KEY": "ls-key-0123456789",
            "BASIC_AUTH_USER": "u",
            "BASIC_AUTH_PASS": "pass-xyz-987",
            "GROUNDLABEL_API_TOKEN": "tok-555-aaa",
        }
    )
    logger = logging.getLogger("groundlabel.test.redaction")
    flt = RedactingFilter(settings.secrets())
    logger.addFilter(flt)
    try:
        with caplog.at_level(logging.INFO, logger="groundlabel.test.redaction"):
            logger.info("calling LS with %s and %s", "ls-key-0123456789", {"password": "pass-xyz-987"})
            logger.warning("Authorization: Bearer tok-555-aaa")
            try:
                raise RuntimeError("token=tok-555-aaa refused")
            except RuntimeError:
                logger.exception("failed")
    finally:
        logger.removeFilter(flt)
    text = caplog.text + "".join(r.exc_text or "" for r in caplog.records)
    assert "calling LS with" in text
    for secret in ("ls-key-0123456789", "pass-xyz-987", "tok-555-aaa"):
        assert secret not in text


def test_install_log_redaction_covers_root_handlers():
    handler = logging.StreamHandler()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        install_log_redaction(["very-secret-value"])
        assert any(isinstance(f, RedactingFilter) for f in handler.filters)
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "value %s", ("very-secret-value",), None)
        for f in handler.filters:
            f.filter(record)
        assert "very-secret-value" not in record.getMessage()
    finally:
        root.removeHandler(handler)


def test_redaction_keeps_access_log_records_formattable():
    """uvicorn's access formatter unpacks record.args: redaction must keep their shape."""
    from uvicorn.logging import AccessFormatter

    formatter = AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s', use_colors=False)
    flt = RedactingFilter(["sekret-token-1"])
    plain = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "POST", "/predict", "1.1", 200), None,
    )
    flt.filter(plain)
    assert formatter.format(plain) == '127.0.0.1:5000 - "POST /predict HTTP/1.1" 200 OK'
    leaky = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", "/x?token=sekret-token-1", "1.1", 404), None,
    )
    flt.filter(leaky)
    line = formatter.format(leaky)
    assert "sekret-token-1" not in line and line.endswith("404 Not Found")


def test_check_authorization():
    s = Settings.from_env({"BASIC_AUTH_USER": "a", "BASIC_AUTH_PASS": "b"})
    good = "Basic " + base64.b64encode(b"a:b").decode()
    s = s.backend
    assert check_authorization(good, s) is None
    assert check_authorization(None, s) is not None
    assert (
        check_authorization("Basic " + base64.b64encode(b"a:c").decode(), s) == "wrong user name or password"
    )
    assert check_authorization("Bearer x", s).startswith("unsupported authorization scheme")
    assert check_authorization(None, Settings.from_env({}).backend) is None


def test_settings_from_env_and_errors():
    s = Settings.from_env(
        {
            "REDIS_URL": "redis://r:6379/1",
            "GROUNDLABEL_PREDICT_TIMEOUT": "50",
            "GROUNDLABEL_ALLOWED_HOSTS": "a.com, b.com:8080",
            "GROUNDLABEL_CHUNK_SIZE": "4",
            "GROUNDLABEL_RETRY_INTERVALS": "1,5",
        }
    )
    assert s.queue.redis_url == "redis://r:6379/1" and s.backend.predict_timeout == 50
    assert s.queue.chunk_size == 4
    assert s.fetch.allowed_hosts == ("a.com", "b.com:8080") and s.queue.retry_intervals == (1.0, 5.0)
    assert "abc123" not in repr(Settings.from_env({"GROUNDLABEL_API_TOKEN": "abc123"}))
    with pytest.raises(UserError, match="GROUNDLABEL_PREDICT_TIMEOUT"):
        Settings.from_env({"GROUNDLABEL_PREDICT_TIMEOUT": "soon"})
    with pytest.raises(UserError, match="BASIC_AUTH_PASS"):
        Settings.from_env({"BASIC_AUTH_USER": "only-user"})
    with pytest.raises(UserError, match="REDIS_URL"):
        Settings.from_env({"REDIS_URL": "localhost:6379"})
    with pytest.raises(UserError, match="GROUNDLABEL_CHUNK_SIZE"):
        Settings.from_env({"GROUNDLABEL_CHUNK_SIZE": "0"})


def model_version_from_env(env: dict) -> str:
    return announced_version(Settings.from_env(env))


def test_model_version_from_env():
    assert model_version_from_env({}) == "gem-ViT-B-16-openai"
    assert (
        model_version_from_env(
            {"GROUNDLABEL_GEM_MODEL": "ViT-L/14", "GROUNDLABEL_GEM_PRETRAINED": "/w/clip-l.pt"}
        )
        == "gem-ViT-L-14-clip-l"
    )
    assert (
        model_version_from_env(
            {"GROUNDLABEL_GEM_PRETRAINED": "none", "GROUNDLABEL_LAVT_CHECKPOINT": "/c/refcoco.pth"}
        )
        == "gem-ViT-B-16-random+lavt-refcoco"
    )
    assert model_version_from_env({"GROUNDLABEL_MODEL_VERSION": "mine-3"}) == "mine-3"
    # non-default GEM options are part of the name, as the worker's engine writes it
    options = {
        "GROUNDLABEL_GEM_IMAGE_SIZE": "672",
        "GROUNDLABEL_GEM_TEMPERATURE": "20",
        "GROUNDLABEL_GEM_REFINE": "pamr",
    }
    assert model_version_from_env(options) == "gem-ViT-B-16-openai-672-d7i1t20-pamr"

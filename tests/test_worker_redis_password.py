"""Redis is always shown and deployed with a password: its writers can fill the workers' queues."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_documented_redis_urls_carry_a_password():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    bare = [
        f"{page.name}: {match.group(0)}"
        for page in pages
        for match in re.finditer(r"rediss?://[^\s`'\"|)]*", page.read_text())
        if not re.match(r"rediss?://[^/@\s]*:[^/@\s]+@", match.group(0))
    ]
    assert not bare, f"Redis URLs without a password: {bare}"


def test_compose_requires_a_redis_password():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    command = services["redis"]["command"]
    assert "--requirepass" in command
    assert command[command.index("--requirepass") + 1].startswith("${REDIS_PASSWORD:?")
    for name in ("backend", "worker"):
        assert services[name]["environment"]["REDIS_URL"].startswith("redis://:${REDIS_PASSWORD:?"), name

"""``groundlabel serve``: the ML backend on uvicorn, wired to its job runner.

With ``REDIS_URL`` the backend enqueues jobs for ``groundlabel worker`` processes; without it, it runs
them in ``--workers-inprocess`` spawned child processes of the workers' in-process runner (the backend
process itself never imports torch). The announced model version is named here, from the engine settings,
by the workers' own naming code.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

    from groundlabel.protocol import JobRunner
    from groundlabel.settings import Settings

log = logging.getLogger("groundlabel.backend")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_runner(settings: Settings, *, warm_up: bool = True, reserve_interactive: bool = False) -> JobRunner:
    """The job runner the settings ask for: RQ on Redis with ``REDIS_URL``, else spawned children
    (``reserve_interactive``: with two or more, one is kept for interactive requests)."""
    if settings.queue.redis_url:
        from labeling_backend.queue import RedisJobQueue

        return RedisJobQueue(settings.queue)
    from workers.inprocess import InProcessRunner

    return InProcessRunner(settings, warm_up=warm_up, reserve_interactive=reserve_interactive)


def build_app(settings: Settings, *, warm_up: bool = True) -> FastAPI:
    """The backend app with its runner and the announced model version (the engines' names)."""
    from labeling_backend.app import create_app
    from workers.engines import all_model_versions, announced_version

    version = announced_version(settings)  # an invalid engine setting is refused here, at start-up
    named = settings.backend.model_version  # the operator's one name: no engine names to look up
    versions = [] if named else all_model_versions(settings.engines)
    runner = make_runner(settings, warm_up=warm_up, reserve_interactive=True)
    return create_app(settings, runner=runner, model_version=version, versions=versions)


def _run(args: argparse.Namespace) -> int:
    import uvicorn

    from groundlabel.redaction import install_log_redaction
    from groundlabel.settings import Settings

    overrides: dict[str, object] = {}
    if args.workers_inprocess is not None:
        if args.workers_inprocess < 1:
            from groundlabel.errors import UserError

            raise UserError("--workers-inprocess must be at least 1")
        overrides["workers_inprocess"] = args.workers_inprocess
    settings = Settings.from_env(**overrides)
    level = (args.log_level or "info").lower()
    logging.getLogger().setLevel(level.upper())
    install_log_redaction(settings.secrets())
    if not settings.backend.auth_enabled and not _is_loopback(args.host):
        log.warning(
            "listening on %s without authentication: set BASIC_AUTH_USER/BASIC_AUTH_PASS or "
            "GROUNDLABEL_API_TOKEN",
            args.host,
        )
    app = build_app(settings)
    workers = settings.backend.workers_inprocess
    mode = "jobs on Redis" if settings.queue.redis_url else f"{workers} in-process worker(s)"
    log.info(
        "groundlabel backend on http://%s:%d, %s, model version %s",
        args.host,
        args.port,
        mode,
        app.state.backend.model_version,
    )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=level,
        access_log=args.access_log,
        timeout_graceful_shutdown=STOP_GRACE_SECONDS,
    )
    server = _server_class()(config, on_exit=app.state.backend.begin_shutdown)
    server.run()
    return 0 if server.started else 3


#: The longest a stopping server waits for its requests to finish before it cancels them.
STOP_GRACE_SECONDS = 10


def _server_class() -> type:
    """uvicorn's server class with the stop notice (uvicorn is imported when a server starts)."""
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, telling the app that it stops as soon as a signal asks it to (before it waits
        for the requests in flight), so that a ``/predict`` waiting for its jobs answers at once."""

        def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
            super().__init__(config)
            self.on_exit = on_exit

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            self.on_exit()
            super().handle_exit(sig, frame)

    return Server


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``serve`` verb."""
    p = subparsers.add_parser(
        "serve",
        help="run the Label Studio ML backend (HTTP)",
        description=(
            "Serve Label Studio's ML backend protocol (/health, /setup, /predict, /webhook, /metrics). "
            "Settings come from environment variables (see docs/backend.md)."
        ),
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=9090, help="port (default: %(default)s)")
    p.add_argument(
        "--workers-inprocess",
        type=int,
        default=None,
        help="child processes running jobs when REDIS_URL is not set "
        "(default: GROUNDLABEL_WORKERS_INPROCESS or 1)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level (default: %(default)s)",
    )
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")
    p.set_defaults(handler=_run)

"""``groundlabel background``: list a backend's background runs, or cancel one.

A *Retrieve Predictions* whose tasks are not all done by the request's deadline leaves the rest to a
background run, which writes their predictions into Label Studio as they are done
(:mod:`labeling_backend.background`). This verb asks the running backend over HTTP, with the credentials
the backend is configured with (``BASIC_AUTH_USER``/``BASIC_AUTH_PASS`` or ``GROUNDLABEL_API_TOKEN``).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from groundlabel.errors import UserError

DEFAULT_BACKEND = "http://127.0.0.1:9090"


def _request(args: argparse.Namespace, method: str, path: str) -> Any:
    import httpx

    from groundlabel.settings import Settings

    backend = Settings.from_env().backend
    auth = None
    headers = {}
    if backend.api_token:
        headers["Authorization"] = f"Bearer {backend.api_token}"
    elif backend.basic_auth_user and backend.basic_auth_pass:
        auth = (backend.basic_auth_user, backend.basic_auth_pass)
    url = args.backend.rstrip("/") + path
    try:
        response = httpx.request(method, url, headers=headers, auth=auth, timeout=30)
    except httpx.HTTPError as exc:
        raise UserError(f"cannot reach the backend at {args.backend}: {type(exc).__name__}: {exc}") from exc
    try:
        body = response.json()
    except ValueError:
        body = {"detail": response.text[:300]}
    if response.status_code >= 400:
        raise UserError(f"the backend answered {response.status_code}: {body.get('detail', body)}")
    return body


def _line(run: dict[str, Any]) -> str:
    age = time.time() - float(run.get("created") or time.time())
    detail = f"  ({run['detail']})" if run.get("detail") else ""
    return (
        f"{run['id']}  project {run['project']:>5}  {run['status']:<9}  {run['written']:>6} written  "
        f"{run['failed']:>5} failed  {run['left']:>6} left  of {run['total']:<6} "
        f"started {age:7.0f} s ago{detail}"
    )


def run_list(args: argparse.Namespace) -> int:
    """Print the backend's latest background runs."""
    body = _request(args, "GET", "/background")
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    if not body.get("enabled"):
        print(f"background runs are off on this backend: {body.get('reason')}")
    runs = body.get("runs") or []
    if not runs:
        print("no background run")
    for run in runs:
        print(_line(run))
        for task, reason in (run.get("failures") or {}).items():
            print(f"    task {task}: {reason}")
    return 0


def run_cancel(args: argparse.Namespace) -> int:
    """Cancel one background run."""
    run = _request(args, "POST", f"/background/{args.run}/cancel")
    if args.json:
        print(json.dumps(run, indent=2))
    else:
        print(_line(run))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``background`` verb."""
    parser = subparsers.add_parser(
        "background",
        help="list or cancel a backend's background runs (Retrieve Predictions finished after its timeout)",
        description=(
            "When Label Studio's Retrieve Predictions sends more tasks than the backend finishes before "
            "its deadline (GROUNDLABEL_PREDICT_TIMEOUT), the backend finishes the rest in a background "
            "run and writes each prediction into Label Studio as it is done. List those runs with their "
            "progress, or cancel one (nothing more of it is written)."
        ),
    )
    parser.add_argument(
        "--backend", default=DEFAULT_BACKEND, help=f"the backend's URL (default {DEFAULT_BACKEND})"
    )
    parser.add_argument("--json", action="store_true", help="print the backend's JSON answer")
    verbs = parser.add_subparsers(dest="action", metavar="ACTION")
    listing = verbs.add_parser("list", help="the latest runs, newest first (the default)")
    listing.set_defaults(handler=run_list)
    cancel = verbs.add_parser("cancel", help="stop a run: nothing more of it is written")
    cancel.add_argument("run", help="the run's id (from `groundlabel background list` or /health)")
    cancel.set_defaults(handler=run_cancel)
    parser.set_defaults(handler=run_list)

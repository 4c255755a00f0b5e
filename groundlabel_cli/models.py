"""``groundlabel models``: list a project's trained versions, promote one by hand, roll back.

Training jobs promote a version only when it beats the current one on the held-out part; this verb is
the operator's override. Workers pick the change up on their next job (no restart).
"""

from __future__ import annotations

import argparse
import json
import sys

from groundlabel.errors import UserError
from groundlabel.model_store import (
    ModelStore,
    StoreFileError,
    check_project,
    check_version_name,
    version_summary,
)

#: The name that means "the base models" to ``promote``.
BASE = "base"


def _store(args: argparse.Namespace) -> ModelStore:
    from groundlabel.settings import Settings

    training = Settings.from_env().training
    url = args.store or training.model_store
    if not url:
        raise UserError("give --store or set GROUNDLABEL_MODEL_STORE")
    return ModelStore.from_url(url, training.s3)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:6.2f}"


def run_list(args: argparse.Namespace) -> int:
    """Handler of ``models list``: 1 when a project's store files are broken (each named on stderr; the
    other projects are listed)."""
    store = _store(args)
    projects = [check_project(args.project)] if args.project is not None else store.projects()
    rows = []
    broken = 0
    for project in projects:
        try:
            promoted = store.promoted_name(project)
            rows += [version_summary(v, promoted) for v in store.versions(project)]
        except StoreFileError as exc:
            if args.project is not None:
                raise
            print(f"groundlabel models: project {project} left out: {exc}", file=sys.stderr)
            broken = 1
    if args.json:
        print(json.dumps(rows, indent=2))
        return broken
    if not rows:
        print("no trained versions" + (f" for project {args.project}" if args.project is not None else ""))
        return broken
    print(f"{'version':<32} {'parent':<32} {'annots':>6} {'oIoU':>7} {'parent':>7}  created")
    for r in rows:
        mark = "*" if r["promoted"] else " "
        held, parent = r["heldout_oIoU"], r["parent_heldout_oIoU"]
        if r["kind"] == "calibration":  # its mean IoU over the labels, in percent
            pair = (r["heldout_mIoU"], r["parent_heldout_mIoU"])
            held, parent = (None if v is None else v / 100 for v in pair)
        print(
            f"{mark}{r['name']:<31} {str(r['parent']):<32} {r['annotation_count']:>6} "
            f"{_fmt(held):>7} {_fmt(parent):>7}  {r['created_at']}"
        )
    print(
        "* promoted (served); oIoU on the held-out part, in percent (a calibration: the mean IoU of its "
        "labels)"
    )
    return broken


def run_promote(args: argparse.Namespace) -> int:
    """Handler of ``models promote`` (forced: no comparison)."""
    store = _store(args)
    project = check_project(args.project)
    name = None if args.version == BASE else check_version_name(args.version)
    store.promote(project, name, args.reason or "promoted by the operator")
    print(f"project {project} now serves {name or 'the base models'}")
    return 0


def run_rollback(args: argparse.Namespace) -> int:
    """Handler of ``models rollback``."""
    store = _store(args)
    project = check_project(args.project)
    previous = store.rollback(project)
    print(f"project {project} now serves {previous or 'the base models'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``models`` verb."""
    p = subparsers.add_parser(
        "models",
        help="list, promote or roll back a project's trained versions (the model store)",
        description="The model store's versions per project (GROUNDLABEL_MODEL_STORE). Training jobs "
        "promote a version only when it beats the current one on the held-out part; promote and "
        "rollback override that. Workers serve the change from their next job on.",
    )
    p.add_argument(
        "--store", help="the model store: a folder or s3://bucket/prefix (default: GROUNDLABEL_MODEL_STORE)"
    )
    verbs = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    ls = verbs.add_parser("list", help="the versions, with held-out metrics; * marks the promoted one")
    ls.add_argument("--project", help="only this project")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(handler=run_list)
    pr = verbs.add_parser("promote", help=f"serve VERSION for the project ('{BASE}': the base models)")
    pr.add_argument("--project", required=True)
    pr.add_argument("version", metavar="VERSION")
    pr.add_argument("--reason", help="recorded in the promotion history")
    pr.set_defaults(handler=run_promote)
    rb = verbs.add_parser("rollback", help="serve the version promoted before the current one")
    rb.add_argument("--project", required=True)
    rb.set_defaults(handler=run_rollback)

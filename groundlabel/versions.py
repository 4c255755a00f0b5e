"""Version names, in one place: how a prediction's ``model_version`` names the engine that made it, what
sharpened or stood in for it, a trained version, and the label config it answered."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import PurePath

from groundlabel.spec import LabelingSpec, spec_tag

#: What a score-map engine's version adds when it grounds an expression standing in for LAVT.
STAND_IN_SUFFIX = "-expressions"


def stand_in(version: str) -> str:
    """The name of the expressions that the engine ``version`` grounds because no LAVT is configured."""
    return version + STAND_IN_SUFFIX


def refined(version: str, sam_version: str) -> str:
    """The name of predictions whose masks a promptable SAM sharpened: ``<engine's>+<SAM's>``."""
    return f"{version}+{sam_version}"


def combined(versions: Iterable[str]) -> str:
    """One image's name when several engines answered its controls: their names joined with ``+``."""
    return "+".join(dict.fromkeys(versions))


def with_lavt(version: str, checkpoint: str | None) -> str:
    """The announced name of a deployment that also answers expressions with LAVT: ``+lavt-<stem>``."""
    return f"{version}+lavt-{PurePath(checkpoint).stem if checkpoint else 'random'}"


def versioned(model_version: str, spec: LabelingSpec) -> str:
    """The model version Label Studio sees for ``spec``: the engine's name and ``-cfg<spec hash>``.

    Changing any option of the label config (a threshold, a prompt, a label) changes it, so Label Studio
    asks for new predictions instead of keeping the old ones.
    """
    return f"{model_version}-cfg{spec_tag(spec)}"


def trained_names(name: str, kind: str) -> list[str]:
    """The names the predictions of the trained version ``name`` of ``kind`` (``gem``, ``lavt``) carry: a
    distilled GEM also grounds expressions standing in for LAVT."""
    return [name, stand_in(name)] if kind == "gem" else [name]


def replaced_by(kind: str, version: str) -> bool:
    """Whether a promoted trained version of ``kind`` replaces the base predictions named ``version``: a
    trained LAVT the expressions (the base LAVT's and GEM's stand-in), a distilled GEM every base GEM name."""
    if kind == "lavt":
        return version.startswith("lavt-") or version.endswith(STAND_IN_SUFFIX)
    if kind == "gem":
        return version.startswith("gem-")
    return False

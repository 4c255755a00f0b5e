"""Version names, in one place: how a prediction's ``model_version`` names the engine that made it, what
sharpened or stood in for it, a trained version, and the label config it answered."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import PurePath

from groundlabel.spec import LabelingSpec, spec_tag

#: What a score-map engine's version adds when it grounds an expression standing in for LAVT.
STAND_IN_SUFFIX = "-expressions"
#: What an engine's version adds when it ran on a CPU in bf16 (``GROUNDLABEL_CPU_PRECISION``): its outputs
#: differ from the fp32 ones, so its predictions and cached results carry another name.
BF16_SUFFIX = "-bf16"


def with_precision(version: str, precision: str) -> str:
    """The name of ``version``'s predictions computed in ``precision`` (``fp32``: the name itself; ``bf16``:
    with :data:`BF16_SUFFIX`)."""
    if precision == "fp32":
        return version
    if precision == "bf16":
        return version if version.endswith(BF16_SUFFIX) else version + BF16_SUFFIX
    raise ValueError(f"unknown precision {precision!r}; expected fp32 or bf16")


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
    """Whether a promoted version of ``kind`` replaces the base predictions named ``version``: a trained
    LAVT the expressions (the base LAVT's and GEM's stand-in), a distilled GEM every base GEM name, a
    calibration the class prompts' (GEM's and SAM 3's, not the expressions')."""
    if kind == "lavt":
        return version.startswith("lavt-") or version.endswith(STAND_IN_SUFFIX)
    if kind == "gem":
        return version.startswith("gem-")
    if kind == "calibration":  # the class prompts' engines, not the expressions'
        return version.startswith(("gem-", "sam3")) and not version.endswith(STAND_IN_SUFFIX)
    return False


def engine_of(model_version: str) -> str:
    """The engines a prediction's ``model_version`` names: the first word of each ``+``-joined part, in
    order (``gem-ViT-B-16-openai-cfg1a2b`` is ``gem``; a GEM mask sharpened by SAM,
    ``gem-ViT-B-16-openai+sam-tiny-cfg1a2b``, is ``gem+sam``; a trained ``lavt-tiny-p7-v2`` is ``lavt``).
    Every engine's and trained version's name starts with its engine's (see the workers' registry)."""
    words = (part.split("-", 1)[0] for part in model_version.split("+") if part)
    return "+".join(dict.fromkeys(w for w in words if w)) or model_version

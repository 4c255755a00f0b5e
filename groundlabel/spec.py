"""The label spec, the contract of the whole system: what a Label Studio label config asks of groundlabel.

The spec is JSON-serialisable (``LabelingSpec.to_dict`` / ``from_dict``): it is what travels in a job's
payload, so a worker never parses XML and never needs the backend's process.

Per-label prompts: a ``<Label value="Car" predicted_values="car,automobile"/>`` is prompted with each
comma-separated value (the best-scoring one wins per pixel); without ``predicted_values`` the label's
own value is its prompt. Per-control options are read from the control tag's attributes, e.g.
``<PolygonLabels name="poly" toName="image" model_score_threshold="0.5" polygon_tolerance="1.5">``.

Engines: ``engine="sam3"`` on a control has SAM 3 answer its class prompts and typed phrases with one
region per instance; ``engine="gem"`` (or no attribute: the deployment's ``GROUNDLABEL_ENGINE``, GEM by
default) keeps GEM's score maps (docs/sam3.md).

This module is the one reader of label configs for ``serve``, ``prelabel``, ``predict`` and the training
job: :func:`read_spec` parses a config, checks its numeric options against :data:`OPTION_BOUNDS` and
gives every control the settings' defaults (``GROUNDLABEL_DEFAULT_THRESHOLD``); :func:`spec_tag` is the
hash that model versions carry, so the same config and settings give the same version everywhere.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from groundlabel.errors import UserError

if TYPE_CHECKING:
    from groundlabel.settings import Settings

#: Control tags that groundlabel fills, mapped to the ``type`` of the results it writes for them.
SUPPORTED_CONTROLS: dict[str, str] = {
    "PolygonLabels": "polygonlabels",
    "BrushLabels": "brushlabels",
    "RectangleLabels": "rectanglelabels",
    "KeyPointLabels": "keypointlabels",
}

#: The built-in engines that answer class prompts and typed phrases (a control's ``engine`` attribute):
#: the names the backend knows; the workers' engine registry holds the same (a test checks).
BUILTIN_ENGINES = ("gem", "sam3")
#: The engine names this process accepts: the built-in ones and those its engine registry added.
CLASS_ENGINES: list[str] = list(BUILTIN_ENGINES)


def declare_engine(name: str) -> None:
    """Accept ``name`` as an engine of class prompts in this process (the engine registry calls it)."""
    if name not in CLASS_ENGINES:
        CLASS_ENGINES.append(name)


def withdraw_engine(name: str) -> None:
    """No longer accept ``name`` (an engine that was declared, not a built-in one)."""
    if name in CLASS_ENGINES and name not in BUILTIN_ENGINES:
        CLASS_ENGINES.remove(name)


#: Control tags that may be present but that groundlabel neither fills nor complains about.
PASSIVE_CONTROLS = {"TextArea", "Choices", "Labels", "Number", "Rating", "Taxonomy", "Relations"}

#: Numeric control options and the closed range each must lie in (``None``: unbounded). A config with an
#: option outside its range is refused when it is read; the region converters read them checked too.
OPTION_BOUNDS: dict[str, tuple[float | None, float | None]] = {
    "model_score_threshold": (0.0, 1.0),
    "polygon_tolerance": (0.0, None),
    "min_region_area": (0.0, None),
    "min_hole_area": (0.0, None),
    "point_width": (0.0, 100.0),
}


@dataclass
class ControlSpec:
    """One control tag groundlabel answers for (``from_name``) on one image (``to_name``)."""

    name: str
    type: str  # one of SUPPORTED_CONTROLS' keys
    to_name: str
    labels: list[str]
    prompts: dict[str, list[str]]  # label -> text prompts (synonyms)
    options: dict[str, str] = field(default_factory=dict)  # the tag's other attributes

    @property
    def result_type(self) -> str:
        """The ``type`` field of the Label Studio results for this control."""
        return SUPPORTED_CONTROLS[self.type]

    def option_float(self, key: str, default: float) -> float:
        """A numeric tag attribute, with a clear error when it is not a number."""
        raw = self.options.get(key)
        if raw is None or raw == "":
            return default
        try:
            return float(raw)
        except ValueError as exc:
            raise UserError(f"control {self.name!r}: attribute {key}={raw!r} is not a number") from exc

    def number(self, key: str, default: float) -> float:
        """The numeric option ``key`` (one of :data:`OPTION_BOUNDS`), else ``default``, checked to be a
        finite number in its range; :class:`UserError` naming the control and the option otherwise."""
        low, high = OPTION_BOUNDS[key]
        value = self.option_float(key, default)
        outside = (low is not None and value < low) or (high is not None and value > high)
        if not math.isfinite(value) or outside:
            bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
            shown = self.options.get(key) or value
            raise UserError(f"control {self.name!r}: {key}={shown!r} must lie in {bounds}")
        return value

    def engine(self, default: str = "gem") -> str:
        """The engine of this control's class prompts: its ``engine`` attribute, else ``default``."""
        name = (self.options.get("engine") or default).strip().lower()
        if name not in CLASS_ENGINES:
            raise UserError(
                f"control {self.name!r}: engine={name!r} is not one of {', '.join(CLASS_ENGINES)}"
            )
        return name


@dataclass
class LabelingSpec:
    """What a label config asks of groundlabel: the image field, the controls, the text field."""

    image_name: str  # the <Image> tag's name (results' to_name)
    image_key: str  # the task data key holding the image URL (the tag's value without "$")
    controls: list[ControlSpec]
    text_name: str | None = None  # a <TextArea> on the image: the referring expression for LAVT
    text_key: str | None = None  # task data key that may hold an expression ("$expr" on the TextArea)

    def all_prompts(self) -> list[str]:
        """Every distinct prompt of every control, in config order."""
        seen: dict[str, None] = {}
        for control in self.controls:
            for label in control.labels:
                for prompt in control.prompts[label]:
                    seen.setdefault(prompt, None)
        return list(seen)

    def without(self, names: set[str] | frozenset[str]) -> LabelingSpec:
        """The same spec without the controls named in ``names``."""
        if not names:
            return self
        kept = [c for c in self.controls if c.name not in names]
        return LabelingSpec(self.image_name, self.image_key, kept, self.text_name, self.text_key)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON for a job payload."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabelingSpec:
        """Inverse of :meth:`to_dict`."""
        controls = [ControlSpec(**c) for c in data["controls"]]
        return cls(**{**data, "controls": controls})


def _split_values(raw: str | None) -> list[str]:
    return [v.strip() for v in (raw or "").split(",") if v.strip()]


#: Tags the Label Studio frontend treats as a control's labels (their ``value`` or ``alias`` is the label).
_LABEL_TAGS = {"Label", "Choice", "Relation"}

#: Tags with ``name`` and ``toName`` that are nevertheless not controls.
_NOT_CONTROL_TAGS = {"Filter"}


@dataclass
class _Tag:
    """One tag of a parsed label config: its name, attributes and (for controls) labels."""

    tag: str
    name: str
    attr: dict[str, str]
    value: str | None = None
    to_name: list[str] = field(default_factory=list)
    labels_attrs: dict[str, _Tag] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return list(self.labels_attrs)


def _parse_tags(xml: str) -> tuple[list[_Tag], list[_Tag]]:
    """The object tags and the control tags of a label config, in document order.

    The rules are Label Studio's own (its SDK's label interface): a control has ``name`` and ``toName``; an
    object has ``name`` and ``value`` (or ``valueList``); a ``<Label>``, ``<Choice>`` or ``<Relation>``
    belongs to its nearest enclosing control, under its ``alias`` or else its ``value``. Parsed with the
    standard library, so that neither the backend nor an export pays for importing the SDK.
    """
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise UserError(f"the label config cannot be parsed: {exc}") from exc
    objects: dict[str, _Tag] = {}
    controls: dict[str, _Tag] = {}

    def visit(node: ET.Element, owner: _Tag | None) -> None:
        attrib = dict(node.attrib)
        name = attrib.get("name")
        if name and attrib.get("toName") and node.tag not in _NOT_CONTROL_TAGS:
            control = _Tag(node.tag, name, attrib, to_name=attrib["toName"].split(","))
            controls[name] = control
        elif name and (attrib.get("value") or attrib.get("valueList")):
            objects[name] = _Tag(node.tag, name, attrib, value=attrib.get("valueList", attrib.get("value")))
        elif node.tag in _LABEL_TAGS and owner is not None:
            value = attrib.get("alias") or attrib.get("value")
            if value is not None:
                owner.labels_attrs[value] = _Tag(node.tag, value, attrib, value=value)
        if name in controls:
            owner = controls[name]
        for child in node:
            visit(child, owner)

    visit(root, None)
    return list(objects.values()), list(controls.values())


def parse_label_config(xml: str) -> LabelingSpec:
    """Parse a Label Studio label config; raise :class:`UserError` with the reason if it is unusable."""
    if not xml or not xml.strip():
        raise UserError("the label config is empty")
    objects, controls_found = _parse_tags(xml)

    images = [o for o in objects if o.tag == "Image"]
    if not images:
        raise UserError("the label config has no <Image> tag: groundlabel pre-labels images")
    image = images[0]
    image_key = (image.value or "").lstrip("$")
    if not image_key:
        raise UserError(f"the <Image name={image.name!r}> tag has no value=\"$field\"")

    controls: list[ControlSpec] = []
    text_name = text_key = None
    unknown: list[str] = []
    for control in controls_found:
        if image.name not in control.to_name:
            continue
        if control.tag in SUPPORTED_CONTROLS:
            labels = control.labels
            if not labels:
                raise UserError(f"control {control.name!r} ({control.tag}) has no <Label> values to predict")
            prompts = {
                label: _split_values(control.labels_attrs[label].attr.get("predicted_values")) or [label]
                for label in labels
            }
            options = {k: str(v) for k, v in control.attr.items() if k not in ("name", "toName")}
            spec_control = ControlSpec(control.name, control.tag, image.name, labels, prompts, options)
            spec_control.engine()  # an unknown engine is refused at /setup, not in a job
            controls.append(spec_control)
        elif control.tag == "TextArea":
            if text_name is None:
                text_name = control.name
                value = control.attr.get("value") or ""
                text_key = value.lstrip("$") or None
        elif control.tag not in PASSIVE_CONTROLS:
            unknown.append(f"{control.name} ({control.tag})")
    if not controls:
        extra = f"; found only {', '.join(unknown)}" if unknown else ""
        raise UserError(
            "the label config has no control groundlabel can fill on the image "
            f"(one of {', '.join(SUPPORTED_CONTROLS)}){extra}"
        )
    return LabelingSpec(image.name, image_key, controls, text_name, text_key)


def check_options(spec: LabelingSpec) -> None:
    """Refuse a control option of :data:`OPTION_BOUNDS` that is not a finite number in its range."""
    for control in spec.controls:
        for key in OPTION_BOUNDS:
            if key in control.options:
                control.number(key, 0.0)


def spec_defaults(settings: Settings | None = None, *, threshold: float | None = None) -> dict[str, str]:
    """The options every control that sets none is given: ``model_score_threshold`` from ``threshold`` (a
    command's own option) or else the settings' ``GROUNDLABEL_DEFAULT_THRESHOLD``."""
    if threshold is None and settings is not None:
        threshold = settings.backend.default_threshold
    return {} if threshold is None else {"model_score_threshold": repr(float(threshold))}


@functools.lru_cache(maxsize=64)
def _read_spec(xml: str, defaults: tuple[tuple[str, str], ...]) -> LabelingSpec:
    spec = parse_label_config(xml)
    check_options(spec)
    for control in spec.controls:
        for key, value in defaults:
            control.options.setdefault(key, value)
    return spec


def read_spec(
    xml: str, settings: Settings | None = None, *, threshold: float | None = None
) -> LabelingSpec:
    """The label spec of ``xml`` as every command uses it: parsed, its options checked, and the defaults of
    :func:`spec_defaults` given to the controls that set none (so they travel in the spec, its tag and
    the model version). Parsed once per distinct config and defaults; the spec is shared, not copied."""
    defaults = spec_defaults(settings, threshold=threshold)
    return _read_spec(xml, tuple(sorted(defaults.items())))


def spec_tag(spec: LabelingSpec) -> str:
    """A short hash of everything in the label spec that changes the output (labels, prompts, options)."""
    blob = json.dumps(spec.to_dict(), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]

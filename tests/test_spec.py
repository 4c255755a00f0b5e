"""The label config parser reads configs as Label Studio's own SDK does, and refuses unusable ones clearly."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from groundlabel.errors import UserError
from groundlabel.settings import Settings
from groundlabel.spec import (
    OPTION_BOUNDS,
    LabelingSpec,
    _parse_tags,
    parse_label_config,
    read_spec,
    spec_defaults,
    spec_tag,
)

ROOT = Path(__file__).resolve().parents[1]

HANDWRITTEN = [
    # synonyms, nested <View> inside a control, a TextArea
    """<View><Image name="image" value="$img"/>
    <PolygonLabels name="poly" toName="image" model_score_threshold="0.5" polygon_tolerance="1.5">
      <Label value="Car" predicted_values="car, automobile"/>
      <View><Label value="Cat" background="red"/></View>
    </PolygonLabels><TextArea name="expr" toName="image" value="$expression" editable="true"/></View>""",
    # alias wins over value; a Label without value is skipped; duplicate values keep the first position
    """<View><Image name="img" value="$image" zoom="true"/>
    <BrushLabels name="brush" toName="img"><Label alias="A" value="Apple"/><Label background="x"/>
    <Label value="Pear"/><Label value="Pear" predicted_values="pear"/></BrushLabels></View>""",
    # several objects, a control on two objects, Choices/Relations, a Filter (not a control), a comment
    """<View><!-- a comment --><Header value="Look"/><Image name="a" value="$a"/><Image name="b" value="$b"/>
    <Filter name="f" toName="rect"/><RectangleLabels name="rect" toName="a,b" engine="sam3">
    <Label value="Bus"/></RectangleLabels><Choices name="ch" toName="a"><Choice value="ok"/>
    <Choice value="bad"/></Choices><Relations><Relation value="near"/></Relations>
    <KeyPointLabels name="kp" toName="b"><Label value="Eye"/></KeyPointLabels></View>""",
    # an object with valueList, entities, a control on an unknown object
    """<View><Paragraphs name="dialog" valueList="$lines"/><Image name="im" value="$u&amp;v"/>
    <PolygonLabels name="p2" toName="nowhere"><Label value="&lt;x&gt;"/></PolygonLabels>
    <PolygonLabels name="p3" toName="im"><Label value="Tom &amp; Jerry"/></PolygonLabels></View>""",
]


def corpus() -> list[str]:
    """The handwritten configs plus every label config the tests and the synthetic exports use."""
    found = list(HANDWRITTEN)
    for path in sorted([*ROOT.glob("tests/*.py"), *ROOT.glob("exporters/*.py")]):
        if path.name == Path(__file__).name:
            continue
        for match in re.finditer(r'"""\s*(<View>.*?</View>)\s*"""', path.read_text(), re.S):
            if "{" not in match.group(1):  # skip format templates
                found.append(match.group(1))
    return found


CORPUS = corpus()


def test_corpus_is_not_empty() -> None:
    assert len(CORPUS) > len(HANDWRITTEN) + 5


@pytest.mark.parametrize("xml", CORPUS, ids=range(len(CORPUS)))
def test_tags_match_label_studio_sdk(xml: str) -> None:
    from label_studio_sdk.label_interface import LabelInterface

    sdk = LabelInterface(xml)
    objects, controls = _parse_tags(xml)
    assert [(o.tag, o.name, o.value) for o in objects] == [(o.tag, o.name, o.value) for o in sdk.objects]
    theirs = list(sdk.controls)
    assert [(c.tag, c.name, c.to_name, c.labels, c.attr) for c in controls] == [
        (c.tag, c.name, list(c.to_name), list(c.labels), dict(c.attr)) for c in theirs
    ]
    for ours, sdk_control in zip(controls, theirs, strict=True):
        for label in ours.labels:
            assert ours.labels_attrs[label].attr == sdk_control.labels_attrs[label].attr


def test_spec_from_handwritten_config() -> None:
    spec = parse_label_config(HANDWRITTEN[0])
    fields = (spec.image_name, spec.image_key, spec.text_name, spec.text_key)
    assert fields == ("image", "img", "expr", "expression")
    (control,) = spec.controls
    assert control.labels == ["Car", "Cat"]
    assert control.prompts == {"Car": ["car", "automobile"], "Cat": ["Cat"]}
    assert control.options == {"model_score_threshold": "0.5", "polygon_tolerance": "1.5"}
    spec = parse_label_config(HANDWRITTEN[2])
    controls = [(c.name, c.type, c.options.get("engine")) for c in spec.controls]
    assert controls == [("rect", "RectangleLabels", "sam3")]
    assert parse_label_config(HANDWRITTEN[3]).controls[0].labels == ["Tom & Jerry"]


@pytest.mark.parametrize(
    ("xml", "reason"),
    [
        ("", "empty"),
        ("<View><Image name='i' value='$i'>", "cannot be parsed"),
        ("<View><Text name='t' value='$t'/></View>", "no <Image> tag"),
        (
            "<View><Image name='i' value='$'/><BrushLabels name='b' toName='i'><Label value='x'/>"
            "</BrushLabels></View>",
            "no value",
        ),
        ("<View><Image name='i' value='$i'/><BrushLabels name='b' toName='i'/></View>", "no <Label> values"),
        ("<View><Image name='i' value='$i'/><Ellipse name='e' toName='i'/></View>", "found only e (Ellipse)"),
        ("<View><Image name='i' value='$i'/><BrushLabels name='b' toName='i' engine='yolo'><Label value='x'/>"
         "</BrushLabels></View>", "engine='yolo'"),
    ],
)
def test_unusable_configs_are_refused_with_the_reason(xml: str, reason: str) -> None:
    with pytest.raises(UserError, match=re.escape(reason)):
        parse_label_config(xml)


def test_parsing_does_not_import_the_sdk() -> None:
    code = (
        "import sys; from groundlabel.spec import parse_label_config;"
        f"parse_label_config({HANDWRITTEN[0]!r}); print('label_studio_sdk' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- the one reader: options checked against their bounds, the settings' defaults, the version tag ------

BOUNDED = """<View><Image name="image" value="$image"/>
<PolygonLabels name="poly" toName="image" polygon_tolerance="2"><Label value="Car"/></PolygonLabels>
<KeyPointLabels name="kp" toName="image" model_score_threshold="0.3"><Label value="Eye"/></KeyPointLabels>
</View>"""


@pytest.mark.parametrize(
    ("attribute", "shown"),
    [
        ('model_score_threshold="1.5"', "model_score_threshold='1.5' must lie in [0.0, 1.0]"),
        ('model_score_threshold="nan"', "model_score_threshold='nan' must lie in [0.0, 1.0]"),
        ('polygon_tolerance="-1"', "polygon_tolerance='-1' must lie in [0.0, inf]"),
        ('min_region_area="-0.5"', "min_region_area='-0.5' must lie in [0.0, inf]"),
        ('min_hole_area="-2"', "min_hole_area='-2' must lie in [0.0, inf]"),
        ('point_width="101"', "point_width='101' must lie in [0.0, 100.0]"),
        ('point_width="abc"', "attribute point_width='abc' is not a number"),
    ],
)
def test_read_spec_refuses_options_outside_their_bounds(attribute: str, shown: str) -> None:
    xml = BOUNDED.replace('polygon_tolerance="2"', attribute)
    assert attribute.split("=")[0] in OPTION_BOUNDS
    with pytest.raises(UserError, match=re.escape(f"control 'poly': {shown}")):
        read_spec(xml)
    parse_label_config(xml)  # the bare parser reads it; the checks belong to read_spec


def test_the_region_converters_read_the_same_bounds() -> None:
    from workers.regions import control_model

    control = parse_label_config(BOUNDED.replace('polygon_tolerance="2"', 'min_hole_area="-2"')).controls[0]
    message = "control 'poly': min_hole_area='-2' must lie in [0.0, inf]"
    with pytest.raises(UserError, match=re.escape(message)):
        control_model(control)
    assert control.number("model_score_threshold", 0.25) == 0.25  # unset: the default, checked too
    with pytest.raises(UserError, match=re.escape("model_score_threshold=2.0 must lie in [0.0, 1.0]")):
        control.number("model_score_threshold", 2.0)
    with pytest.raises(KeyError):
        control.number("undeclared_option", 1.0)  # every numeric option has its bounds declared


def test_read_spec_gives_controls_the_settings_defaults() -> None:
    settings = Settings.from_env({"GROUNDLABEL_DEFAULT_THRESHOLD": "0.05"})
    spec = read_spec(BOUNDED, settings)
    poly, kp = spec.controls
    assert poly.options == {"polygon_tolerance": "2", "model_score_threshold": "0.05"}
    assert kp.options == {"model_score_threshold": "0.3"}  # a control's own threshold wins
    assert read_spec(BOUNDED, settings, threshold=0.2).controls[0].options["model_score_threshold"] == "0.2"
    assert "model_score_threshold" not in read_spec(BOUNDED, Settings.from_env({})).controls[0].options
    assert spec_defaults(settings) == {"model_score_threshold": "0.05"} and spec_defaults() == {}
    # the default is part of the spec, so of its tag and of every model version named after it
    assert spec_tag(spec) != spec_tag(parse_label_config(BOUNDED))
    assert spec_tag(spec) == spec_tag(read_spec(BOUNDED, settings)) == spec_tag(
        LabelingSpec.from_dict(spec.to_dict())
    )

"""``groundlabel report``'s tables (their columns, for the terminal and the page) and ``--html DIR``: one page
with the tables and three plots drawn with Pillow.

- ``iou_per_label.png``: the mean mask IoU of each control and label, one bar per model version;
- ``iou_distribution.png``: how the per-task mask IoUs spread (twenty bins), one series per model version;
- ``changes.png``: per model version, the share of regions kept as predicted, edited, deleted and added.

The page (``index.html``) needs nothing but the PNGs beside it: no script, no style sheet from elsewhere.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Series colours (model versions), then the colours of kept, edited, deleted and added.
PALETTE = ["#3366cc", "#dc7633", "#2e9e5b", "#9b59b6", "#c0392b", "#16a085", "#7f8c8d", "#b7950b"]
CHANGE_COLOURS = {"kept": "#2e9e5b", "edited": "#f1c40f", "deleted": "#c0392b", "added": "#3366cc"}
DISTRIBUTION_BINS = 20
MAX_SERIES = len(PALETTE)  # the versions plotted (the most tasks first); the tables list them all


def _font(size: int) -> Any:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


class _Chart:
    """A white canvas with a plot area, axes and a legend."""

    def __init__(self, width: int, height: int, title: str, *, left: int = 60, bottom: int = 90) -> None:
        from PIL import Image, ImageDraw

        self.image = Image.new("RGB", (width, height), "white")
        self.draw = ImageDraw.Draw(self.image)
        self.font, self.small = _font(14), _font(12)
        self.box = (left, 52, width - 20, height - bottom)  # plot area: x0, y0, x1, y1
        self.draw.text((left, 8), title, fill="black", font=_font(16))

    def y_axis(self, top: float, label: str, ticks: Sequence[float]) -> None:
        x0, y0, x1, y1 = self.box
        for t in ticks:
            y = self.y(t, top)
            self.draw.line((x0, y, x1, y), fill="#e0e0e0")
            self.draw.text((x0 - 6, y), f"{t:g}", fill="black", font=self.small, anchor="rm")
        self.draw.line((x0, y0, x0, y1), fill="black")
        self.draw.line((x0, y1, x1, y1), fill="black")
        self.draw.text((x0 - 6, y0 - 14), label, fill="black", font=self.small, anchor="rb")

    def y(self, value: float, top: float) -> float:
        _, y0, _, y1 = self.box
        return y1 - (y1 - y0) * (value / top if top else 0.0)

    def legend(self, items: Sequence[tuple[str, str]]) -> None:
        x, y = self.box[0], self.image.height - 28
        for name, colour in items:
            self.draw.rectangle((x, y, x + 12, y + 12), fill=colour)
            text = name if len(name) <= 80 else name[:77] + "..."
            self.draw.text((x + 16, y + 6), text, fill="black", font=self.small, anchor="lm")
            x += 16 + int(self.draw.textlength(text, font=self.small)) + 18

    def save(self, path: Path) -> Path:
        self.image.save(path, optimize=True)
        return path


def _versions(summary: dict[str, Any]) -> list[str]:
    """The model versions that answered tasks, the most tasks first, at most :data:`MAX_SERIES`."""
    rows = [v for v in summary["versions"] if v["model_version"] != "none"]
    rows.sort(key=lambda v: (-v["tasks"], v["model_version"]))
    return [v["model_version"] for v in rows[:MAX_SERIES]]


def plot_iou_per_label(summary: dict[str, Any], path: Path) -> Path:
    """Grouped bars: per control and label, each model version's mean mask IoU."""
    versions = _versions(summary)
    keys = sorted({(g["control"], g["label"]) for g in summary["groups"] if g["mask_iou_mean"] is not None})
    means = {
        (g["model_version"], g["control"], g["label"]): g["mask_iou_mean"]
        for g in summary["groups"]
        if g["mask_iou_mean"] is not None
    }
    font = _font(13)
    widest = max([font.getlength(t) for key in keys for t in key] or [0])  # names on two lines
    slot_width = max(24 * max(len(versions), 1) + 30, widest + 14)
    width = max(640, int(90 + len(keys) * slot_width))
    chart = _Chart(width, 440, "Mean mask IoU per label and model version (1 = kept as predicted)")
    chart.y_axis(1.0, "IoU", [0, 0.25, 0.5, 0.75, 1.0])
    x0, _, x1, y1 = chart.box
    slot = (x1 - x0) / max(len(keys), 1)
    bar = min(40.0, (slot - 16) / max(len(versions), 1))
    for k, (control, label) in enumerate(keys):
        left = x0 + k * slot + (slot - bar * len(versions)) / 2
        for n, version in enumerate(versions):
            value = means.get((version, control, label))
            if value is None:
                continue
            bx = left + n * bar
            chart.draw.rectangle((bx, chart.y(value, 1.0), bx + bar - 2, y1), fill=PALETTE[n])
            chart.draw.text((bx + bar / 2, chart.y(value, 1.0) - 2), f"{value:.2f}", fill="black",
                            font=chart.small, anchor="md")  # fmt: skip
        chart.draw.multiline_text(
            (x0 + (k + 0.5) * slot, y1 + 6),
            f"{label}\n{control}",
            fill="black",
            font=font,
            anchor="ma",
            align="center",
        )
    chart.legend([(v, PALETTE[n]) for n, v in enumerate(versions)])
    return chart.save(path)


def plot_iou_distribution(summary: dict[str, Any], path: Path) -> Path:
    """Per model version, the share of (task, label) pairs in each twentieth of IoU."""
    versions = _versions(summary)
    counts = {v: [0] * DISTRIBUTION_BINS for v in versions}
    for g in summary["groups"]:
        if g["model_version"] in counts:
            for value in g["ious"]:
                counts[g["model_version"]][min(int(value * DISTRIBUTION_BINS), DISTRIBUTION_BINS - 1)] += 1
    shares = {v: [c / max(sum(cs), 1) for c in cs] for v, cs in counts.items()}
    top = max([0.1, *(s for ss in shares.values() for s in ss)])
    top = min(1.0, round(top + 0.05, 1))
    chart = _Chart(760, 400, "Distribution of mask IoU (each task's label against its prediction)")
    chart.y_axis(top, "share", [round(top * i / 4, 3) for i in range(5)])
    x0, _, x1, y1 = chart.box
    slot = (x1 - x0) / DISTRIBUTION_BINS
    bar = (slot - 4) / max(len(versions), 1)
    for b in range(DISTRIBUTION_BINS):
        for n, version in enumerate(versions):
            value = shares[version][b]
            if value:
                bx = x0 + b * slot + 2 + n * bar
                chart.draw.rectangle((bx, chart.y(value, top), bx + max(bar - 1, 1), y1), fill=PALETTE[n])
        if b % 4 == 0:
            chart.draw.text((x0 + b * slot, y1 + 6), f"{b / DISTRIBUTION_BINS:.1f}", fill="black",
                            font=chart.small, anchor="ma")  # fmt: skip
    chart.draw.text((x1, y1 + 6), "1.0", fill="black", font=chart.small, anchor="ra")
    chart.draw.text(((x0 + x1) / 2, y1 + 26), "mask IoU", fill="black", font=chart.font, anchor="ma")
    chart.legend([(v, PALETTE[n]) for n, v in enumerate(versions)])
    return chart.save(path)


def plot_changes(summary: dict[str, Any], path: Path) -> Path:
    """Per model version, one bar split into the shares of regions kept, edited, deleted and added."""
    rows = [v for v in summary["versions"] if v["model_version"] in set(_versions(summary))]
    height = 110 + 46 * max(len(rows), 1)
    title = "What annotators did to the regions (share of all regions)"
    chart = _Chart(760, height, title, left=20, bottom=50)
    x0, y0, x1, _ = chart.box
    for n, v in enumerate(rows):
        total = sum(v[c] for c in CHANGE_COLOURS) or 1
        y = y0 + 8 + n * 46
        chart.draw.text((x0, y), v["model_version"], fill="black", font=chart.small)
        left = float(x0)
        for change, colour in CHANGE_COLOURS.items():
            w = (x1 - x0) * v[change] / total
            if w > 0:
                chart.draw.rectangle((left, y + 16, left + w, y + 36), fill=colour)
                if w > 34:
                    text = f"{100 * v[change] / total:.0f}%"
                    chart.draw.text((left + w / 2, y + 26), text, fill="black", font=chart.small, anchor="mm")
            left += w
    chart.legend(list(CHANGE_COLOURS.items()))
    return chart.save(path)


#: The columns of the per-version table: (header, key, format); formats are :func:`cell`'s.
VERSION_COLUMNS = [
    ("model version", "model_version", "text"),
    ("engine", "engine", "text"),
    ("tasks", "tasks", "int"),
    ("lead time s", "lead_time_mean", "seconds"),
    ("lead time s (median)", "lead_time_median", "seconds"),
    ("mask IoU", "mask_iou_mean", "ratio"),
    ("kept", "kept", "int"),
    ("edited", "edited", "int"),
    ("deleted", "deleted", "int"),
    ("added", "added", "int"),
    ("kept %", "kept_rate", "percent"),
]
#: The columns of the per-label table.
GROUP_COLUMNS = [
    ("model version", "model_version", "text"),
    ("control", "control", "text"),
    ("label", "label", "text"),
    ("kind", "kind", "text"),
    ("tasks", "tasks", "int"),
    ("IoU mean", "mask_iou_mean", "ratio"),
    ("IoU median", "mask_iou_median", "ratio"),
    ("boundary F", "boundary_f_mean", "ratio"),
    ("box IoU", "box_iou_mean", "ratio"),
    ("point px", "point_distance_mean", "seconds"),
    ("kept", "kept", "int"),
    ("edited", "edited", "int"),
    ("deleted", "deleted", "int"),
    ("added", "added", "int"),
    ("kept %", "kept_rate", "percent"),
    ("added %", "added_rate", "percent"),
]


def cell(value: Any, form: str, empty: str = "-") -> str:
    """One figure as text: ``ratio`` with 3 decimals, ``seconds`` (and pixels) with 1, ``percent`` of a
    ratio, anything else as it is; ``empty`` for a figure that does not apply (None, "")."""
    if value is None or value == "":
        return empty
    if form == "ratio":
        return f"{value:.3f}"
    if form == "seconds":
        return f"{value:.1f}"
    if form == "percent":
        return f"{100 * value:.0f}%"
    return str(value)


def table_rows(
    rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]], empty: str = "-"
) -> list[list[str]]:
    """The cells of ``rows`` under ``columns``."""
    return [[cell(row[key], form, empty) for _, key, form in columns] for row in rows]


def _html_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    text = ['class="t"' if form == "text" else "" for _, _, form in columns]  # text to the left
    head = "".join(f"<th {t}>{html.escape(h)}</th>" for (h, _, _), t in zip(columns, text, strict=True))
    body = "".join(
        "<tr>" + "".join(f"<td {t}>{html.escape(c)}</td>" for c, t in zip(row, text, strict=True)) + "</tr>"
        for row in table_rows(rows, columns, empty="\u2013")
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1200px; }
table { border-collapse: collapse; margin: 8px 0 24px; font-size: 14px; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: right; }
th.t, td.t { text-align: left; }
th { background: #f4f4f4; }
img { display: block; margin: 8px 0 24px; max-width: 100%; }
.note { color: #555; font-size: 14px; }
"""


def write_html(report: dict[str, Any], summary: dict[str, Any], folder: Path) -> Path:
    """Write ``folder/index.html`` and its three PNGs; returns the page's path."""
    folder.mkdir(parents=True, exist_ok=True)
    plot_iou_per_label(summary, folder / "iou_per_label.png")
    plot_iou_distribution(summary, folder / "iou_distribution.png")
    plot_changes(summary, folder / "changes.png")
    t = report["tasks"]
    versions = _html_table(report["versions"], VERSION_COLUMNS)
    groups = _html_table(report["groups"], GROUP_COLUMNS)
    errors = ""
    if report["errors"]["count"]:
        items = "".join(f"<li>{html.escape(e)}</li>" for e in report["errors"]["first"])
        errors = f"<h2>Regions that could not be measured ({report['errors']['count']})</h2><ul>{items}</ul>"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>groundlabel report: {html.escape(report["source"])}</title>
<style>{_STYLE}</style></head><body>
<h1>How good are the pre-labels? {html.escape(report["source"])}</h1>
<p>{t["read"]} tasks, {t["annotated"]} annotated: {t["from_prediction"]} from a prediction,
{t["without_prediction"]} without one. Each task's latest submitted annotation is compared with the prediction
it started from.</p>
<h2>Per model version</h2>{versions}
<img src="changes.png" alt="kept, edited, deleted and added regions per model version">
<img src="iou_per_label.png" alt="mean mask IoU per label and model version">
<img src="iou_distribution.png" alt="distribution of mask IoU">
<h2>Per label</h2>{groups}
<p class="note">Mask IoU and boundary F (2 px) compare the union of a label's brush and polygon regions in the
prediction with the annotation's, per task. Regions are matched by id, else by IoU of at least 0.5 within one
control: <b>kept</b> means the same pixels and labels, <b>edited</b> changed, <b>deleted</b> predicted but not
submitted, <b>added</b> drawn by the annotator. Kept, edited and deleted rates are shares of the predicted
regions; the added rate is a share of the submitted ones.</p>
{errors}
</body></html>
"""
    out = folder / "index.html"
    out.write_text(page, encoding="utf-8")
    return out

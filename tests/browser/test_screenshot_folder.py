"""Where the browser tests' screenshots go: outside the tracked tree unless the docs' pictures are asked."""

from __future__ import annotations

from pathlib import Path

from labelstudio_page import DOCS_IMAGES, REPO, ScreenshotSummary, screenshot_folder


def test_by_default_the_screenshots_go_under_pytests_temporary_folder(tmp_path: Path) -> None:
    folder = screenshot_folder(tmp_path, {})
    assert folder == tmp_path / "screenshots"
    assert REPO not in folder.parents
    assert screenshot_folder(tmp_path, {"GROUNDLABEL_UPDATE_DOCS_IMAGES": "0"}) == folder


def test_the_docs_pictures_are_replaced_only_on_request(tmp_path: Path) -> None:
    assert DOCS_IMAGES == REPO / "docs" / "images"
    for value in ("1", "true", "yes"):
        assert screenshot_folder(tmp_path, {"GROUNDLABEL_UPDATE_DOCS_IMAGES": value}) == DOCS_IMAGES
    chosen = tmp_path / "elsewhere"
    assert screenshot_folder(tmp_path, {"GROUNDLABEL_TEST_SCREENSHOTS": str(chosen)}) == chosen


class Reporter:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write_line(self, line: str) -> None:
        self.lines.append(line)


def test_the_session_report_names_the_folder_when_pictures_were_taken(tmp_path: Path) -> None:
    reporter = Reporter()
    summary = ScreenshotSummary(tmp_path / "screenshots")
    summary.pytest_terminal_summary(reporter)
    assert reporter.lines == []  # nothing taken, nothing said
    (tmp_path / "screenshots").mkdir()
    (tmp_path / "screenshots" / "typed-prompt.png").write_bytes(b"")
    summary.pytest_terminal_summary(reporter)
    assert reporter.lines == [f"browser screenshots in {tmp_path / 'screenshots'}: typed-prompt.png"]

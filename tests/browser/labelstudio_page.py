"""Label Studio's labelling page in a real browser: Debian's Chromium driven by Playwright.

Playwright's own browser builds are never downloaded: the tests launch ``/usr/bin/chromium``
(``bash scripts/setup.sh test`` installs it) headless, with a fresh profile and no background traffic.
:class:`LabelingPage` does what an annotator does on the page (log in, open a task, turn on
*Auto-Annotation*, type a prompt, click with a smart tool, accept suggestions, submit) with role and
text selectors where the page has them, and reads back what is drawn: the region list as shown, and
the regions of the annotation under edit as Label Studio would store them (``serializeAnnotation``).
Screenshots go to pytest's temporary folder unless asked elsewhere (:func:`screenshot_folder`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: The docs' pictures: the screenshots replace them only when ``GROUNDLABEL_UPDATE_DOCS_IMAGES=1``.
DOCS_IMAGES = REPO / "docs" / "images"
#: Tall enough for a square task image: Label Studio fits the image to the canvas width.
VIEWPORT = {"width": 1280, "height": 960}
#: How long the page may take to show what the backend answered (the tiny model answers in about 1 s).
ANSWER_TIMEOUT_MS = 60_000


def screenshot_folder(basetemp: Path, env: Mapping[str, str] | None = None) -> Path:
    """Where the screenshots go: ``docs/images/`` when ``GROUNDLABEL_UPDATE_DOCS_IMAGES`` is ``1`` (the
    explicit opt-in that updates the docs' pictures), else the folder ``GROUNDLABEL_TEST_SCREENSHOTS``
    names, else ``<basetemp>/screenshots`` (pytest's temporary folder), so a test run leaves the tree as
    it found it."""
    env = os.environ if env is None else env
    if env.get("GROUNDLABEL_UPDATE_DOCS_IMAGES", "").strip().lower() in ("1", "true", "yes", "on"):
        return DOCS_IMAGES
    if env.get("GROUNDLABEL_TEST_SCREENSHOTS"):
        return Path(env["GROUNDLABEL_TEST_SCREENSHOTS"])
    return Path(basetemp) / "screenshots"


class ScreenshotSummary:
    """A pytest plugin that names, at the end of the session's report, the folder the screenshots went to."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        pictures = sorted(self.folder.glob("*.png")) if self.folder.is_dir() else []
        if pictures:
            names = ", ".join(p.name for p in pictures)
            terminalreporter.write_line(f"browser screenshots in {self.folder}: {names}")


def browser_available() -> tuple[bool, str]:
    """Whether Chromium and Playwright are installed, and if not, why."""
    if not CHROMIUM.exists():
        return False, f"{CHROMIUM} is missing (bash scripts/setup.sh test installs chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False, "the playwright package is missing (pip install -e '.[dev]')"
    return True, ""


def require_browser() -> None:
    """Skip the calling test when the browser is not installed; fail under CI=true, where it must be."""
    import pytest

    ok, reason = browser_available()
    if ok:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


@contextmanager
def chromium() -> Iterator[Any]:
    """A Playwright browser context on Debian's Chromium with a fresh profile, closed on exit."""
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="groundlabel-chromium-")
    try:
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                profile,
                executable_path=str(CHROMIUM),
                headless=True,
                args=CHROMIUM_ARGS,
                viewport=VIEWPORT,
            )
            context.set_default_timeout(30_000)
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def log_in(page: Any, url: str, email: str, password: str) -> None:
    """Log in through Label Studio's login form."""
    page.goto(url + "/user/login/")
    page.fill("input[name=email]", email)
    page.fill("input[name=password]", password)
    page.locator("button[type=submit]").click()
    page.wait_for_url(lambda u: "/user/login" not in u)


class LabelingPage:
    """One Label Studio page as an annotator uses it."""

    def __init__(self, page: Any, url: str, screenshots: Path) -> None:
        self.page = page
        self.url = url
        self.screenshots = screenshots

    # -- navigation ---------------------------------------------------------------------------------

    def open_task(self, project: int, task: int) -> None:
        """Open a task in the labelling view, wait until its image is shown, and fit it to the canvas."""
        self.page.goto(f"{self.url}/projects/{project}/data?task={task}")
        self.page.get_by_role("button", name="Submit").wait_for()
        self.page.wait_for_function(
            "() => window.Htx?.annotationStore?.selected?.objects?.some(o => o.imageIsLoaded ?? o.isReady)",
            timeout=ANSWER_TIMEOUT_MS,
        )
        self.fit_image()

    def fit_image(self) -> None:
        """*Zoom to fit*: the whole image in view. Label Studio fits the image to the canvas before the
        panels below take their room and keeps that zoom, so a tall image's edges would be hidden."""
        # Asked again at each poll: a fit asked for while the page still lays itself out can be undone.
        self.page.wait_for_function(
            """() => {
                const image = window.Htx.annotationStore.selected.objects.find(o => o.type === 'image');
                if (image.zoomScale !== 1) image.sizeToFit();
                return image.zoomScale === 1;
            }""",
            polling=250,
            timeout=ANSWER_TIMEOUT_MS,
        )

    def open_data_manager(self, project: int) -> None:
        self.page.goto(f"{self.url}/projects/{project}/data")
        self.page.get_by_label("Tasks Actions").wait_for()

    # -- auto-annotation ----------------------------------------------------------------------------

    def enable_auto_annotation(self, *, auto_accept: bool = False) -> None:
        """Turn on *Auto-Annotation* (and *Auto-Accept Suggestions* when asked) in the bottom bar."""
        toggle = self.page.get_by_test_id("bottombar-auto-annotation-toggle")
        if not toggle.is_checked():
            self.page.get_by_text("Auto-Annotation", exact=True).click()
        self.page.wait_for_function("() => window.Htx.autoAnnotation === true")
        if auto_accept:
            accept = self.page.get_by_test_id("bottombar-auto-accept-toggle")
            if not accept.is_checked():
                self.page.get_by_text("Auto-Accept Suggestions", exact=True).click()
            self.page.wait_for_function("() => window.Htx.autoAcceptSuggestions === true")

    def type_prompt(self, text: str) -> None:
        """Type into the prompt box (the label config's TextArea) and press its *Add* button."""
        box = self.page.get_by_role("textbox").first
        box.fill(text)
        self.page.get_by_role("button", name="Add").click()

    @contextmanager
    def answer(self) -> Iterator[dict[str, Any]]:
        """Catch the interactive request that the actions inside the ``with`` make the page send.

        On exit the dict holds ``context`` (what the page sent to Label Studio) and ``data`` (the
        prediction Label Studio passed back from the backend), and the page has loaded the answer.
        """
        caught: dict[str, Any] = {}
        with self.page.expect_response(
            lambda r: "/interactive-annotating" in r.url, timeout=ANSWER_TIMEOUT_MS
        ) as response:
            yield caught
        answer = response.value
        assert answer.status == 200, answer.text()
        body = answer.json()
        assert not body.get("errors"), body["errors"]
        caught["context"] = answer.request.post_data_json["context"]
        caught["data"] = body["data"]
        self.page.wait_for_function("() => window.Htx.awaitingSuggestions === false")

    def wait_for_suggestions(self) -> int:
        """Wait until the page shows suggestions; return how many."""
        self.page.wait_for_function(
            "() => window.Htx.awaitingSuggestions === false"
            " && window.Htx.annotationStore.selected.suggestions.size > 0",
            timeout=ANSWER_TIMEOUT_MS,
        )
        return int(self.page.evaluate("() => window.Htx.annotationStore.selected.suggestions.size"))

    def accept_suggestions(self) -> None:
        """Press the bottom bar's accept button (the check mark next to "N suggestions")."""
        self.page.get_by_test_id("bottombar-accept-suggestions-button").click()
        self.page.wait_for_function("() => window.Htx.annotationStore.selected.suggestions.size === 0")

    # -- tools --------------------------------------------------------------------------------------

    def choose_label(self, label: str, control: int = 0) -> None:
        """Click ``label`` in the label bar of the ``control``-th labels control (in config order)."""
        self.page.locator(".lsf-labels").nth(control).locator(".lsf-label", has_text=label).click()

    def choose_smart_tool(self, name: str) -> None:
        """Pick a tool of the toolbar's *Auto-Detect* group (shown with *Auto-Annotation* on) by label."""
        self.page.locator(".lsf-tool_smart").first.hover()
        self.page.locator(".lsf-toolbar__smart").get_by_label(name).click()

    def image_box(self) -> dict[str, float]:
        """Where the image is on the screen: the canvas's box moved and scaled by the image's zoom.

        Label Studio may show the image zoomed (it fits the image to the canvas before the panels below
        take their room, then keeps that zoom), so the canvas's own box is not the image's.
        """
        stage = self.page.locator(".konvajs-content").first.bounding_box()
        assert stage, "the image canvas is not on the page"
        view = self.page.evaluate(
            "() => { const o = window.Htx.annotationStore.selected.objects.find(o => o.type === 'image');"
            " return [o.zoomingPositionX, o.zoomingPositionY, o.stageWidth, o.stageHeight, o.zoomScale]; }"
        )
        dx, dy, width, height, scale = (float(v) for v in view)
        return {"x": stage["x"] + dx, "y": stage["y"] + dy, "width": width * scale, "height": height * scale}

    def _screen(self, x: float, y: float) -> tuple[float, float]:
        box = self.image_box()
        return box["x"] + box["width"] * x / 100, box["y"] + box["height"] * y / 100

    def click_image(self, x: float, y: float, *, negative: bool = False) -> None:
        """Click the image at percent coordinates (x, y); ``negative`` holds Alt (a negative smart point)."""
        sx, sy = self._screen(x, y)
        if negative:
            self.page.keyboard.down("Alt")
        try:
            self.page.mouse.click(sx, sy)
        finally:
            if negative:
                self.page.keyboard.up("Alt")

    def drag_on_image(self, x0: float, y0: float, x1: float, y1: float) -> None:
        """Drag a box on the image from (x0, y0) to (x1, y1), in percent."""
        mouse = self.page.mouse
        mouse.move(*self._screen(x0, y0))
        mouse.down()
        mouse.move(*self._screen(x1, y1), steps=8)
        mouse.up()

    # -- reading back -------------------------------------------------------------------------------

    def results(self) -> list[dict[str, Any]]:
        """The annotation's results as Label Studio would store them."""
        return self.page.evaluate("() => window.Htx.annotationStore.selected.serializeAnnotation()")

    def region_list(self) -> list[str]:
        """The texts of the region list's items as shown (e.g. "Thing")."""
        items = self.page.locator(".lsf-outliner-item__title")
        return [t.strip() for t in items.all_inner_texts()]

    def submit(self) -> None:
        """Press *Submit* and wait until Label Studio has stored the annotation."""
        with self.page.expect_response(
            lambda r: "/annotations" in r.url and r.request.method == "POST"
        ) as response:
            self.page.get_by_role("button", name="Submit").click()
        assert response.value.status in (200, 201), response.value.text()

    def screenshot(self, name: str) -> Path:
        """Save the page as ``<screenshots>/<name>.png`` (:func:`screenshot_folder`)."""
        self.screenshots.mkdir(parents=True, exist_ok=True)
        path = self.screenshots / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path

"""axe-core accessibility checks of the built site, light and dark palette.

Our templates and CSS render inside ``.md-content``; there axe must find nothing. Findings
in the theme's chrome (header, navigation, search) and in CONTRIBUTING.md's own Markdown are
written to test-artifacts/axe-<scheme>.json for review, not asserted. axe-core is an npm package:
``npm install --prefix /tmp/axe axe-core@4`` and set AXE_CORE_JS=/tmp/axe/node_modules/axe-core/axe.min.js
(or install it into ./node_modules). Without it these tests skip, unless REQUIRE_AXE is set.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = ["", "papers/architecture/", "browse/", "datasets/", "codebases/", "questions/", "implementations/",
         "cite/", "contributing/", "about/"]
DARK_PAGES = ["", "papers/architecture/", "browse/", "implementations/", "cite/"]  # one of each template kind
NOT_OURS = {"contributing/"}  # CONTRIBUTING.md's own Markdown: reported in the artifact, not asserted
# The theme fades link and code colours when the scheme changes, and headless chromium starts the
# fades only when a frame is drawn, which axe's own scrolling can trigger mid-run: a fixed 400 ms
# wait let CI measure one half-faded link. With transitions off, axe sees the final colours at once.
NO_TRANSITIONS = "*, *::before, *::after { transition: none !important; animation: none !important; }"


@pytest.fixture(scope="module")
def axe_source() -> str:
    candidates = [os.environ.get("AXE_CORE_JS"), ROOT / "node_modules" / "axe-core" / "axe.min.js"]
    for path in candidates:
        if path and Path(path).is_file():
            return Path(path).read_text(encoding="utf-8")
    if os.environ.get("REQUIRE_AXE"):
        pytest.fail("axe-core not found: set AXE_CORE_JS to axe.min.js")
    pytest.skip("axe-core not installed (set AXE_CORE_JS to axe.min.js; REQUIRE_AXE=1 makes this a failure)")


def run_axe(page, axe_source: str, context: object) -> list[dict]:
    page.add_script_tag(content=axe_source)
    result = page.evaluate("ctx => axe.run(ctx, {resultTypes: ['violations']})", context)
    return [{"id": v["id"], "impact": v["impact"], "help": v["help"],
             "targets": [n["target"] for n in v["nodes"]][:5]} for v in result["violations"]]


@pytest.mark.parametrize("scheme", ["default", "slate"])
def test_no_axe_violations_in_our_content(page, axe_source, artifacts, scheme):
    ours, theme = {}, {}
    for path in PAGES if scheme == "default" else DARK_PAGES:
        page.goto(path)
        page.add_style_tag(content=NO_TRANSITIONS)
        page.evaluate(f"document.body.setAttribute('data-md-color-scheme', '{scheme}')")
        page.evaluate("document.querySelectorAll('.md-content details').forEach(d => d.open = true)")
        found = run_axe(page, axe_source, {"include": [[".md-content"]]})
        if found:
            (theme if path in NOT_OURS else ours)[path] = found
        if path == "":  # the theme's header, navigation and search are the same on every page
            theme["(theme chrome)"] = run_axe(page, axe_source, {"exclude": [[".md-content"]]})
    (artifacts / f"axe-{scheme}.json").write_text(json.dumps({"ours": ours, "not ours": theme}, indent=1),
                                                   encoding="utf-8")
    assert not ours, json.dumps(ours, indent=1)[:4000]

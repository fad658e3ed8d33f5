"""The docs: the site builds with `mkdocs build --strict` (no broken link or anchor); its
generated references match the code (settings from `Settings`, operations from the app's
OpenAPI); the hand-written pages name only requests the app routes and explain every error
code it can answer; README.md stays a landing page that runs the test command .ci/run runs."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from starlette.routing import Match

from service.app import create_app
from service.errors import ERROR_CODES
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = sorted(DOCS.glob("*.md"))


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_reference", DOCS / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = load_generator()


@pytest.fixture(scope="module")
def app():
    return create_app(Settings.model_construct())  # the defaults, whatever this shell's CDT_* say


def table_rows(text: str, heading: str) -> list[list[str]]:
    """The cells of the first table under `heading`, header and rule left out."""
    section = text.split(f"\n{heading}\n", 1)[1]
    lines = [line for line in section.split("\n## ", 1)[0].splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines[2:]]


def test_site_builds_strict(tmp_path):
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr
    built = {path.parent.name for path in site.glob("*/index.html")}
    assert {page.stem for page in PAGES} - {"index"} <= built, "a page of docs/ is not in the site"
    assert (site / "web-page.png").is_file()


def test_generated_references_are_current():
    assert gen.stale_pages() == [], "run: python docs/gen_reference.py"


def test_a_stale_reference_is_rewritten():
    page = (DOCS / "settings.md").read_text()
    stale = page.replace("| `CDT_QUEUE_SIZE` | `8` |", "| `CDT_QUEUE_SIZE` | `16` |")
    assert stale != page and gen.render(stale) == page


def test_every_setting_is_documented_once_in_its_field():
    assert all(field.description for field in Settings.model_fields.values())
    rows = table_rows((DOCS / "settings.md").read_text(), "<!-- generated: settings -->")
    assert [row[0] for row in rows] == [f"`{name}`" for name in Settings.env_names().values()]


def test_the_error_table_explains_every_code_the_api_answers(app):
    rows = table_rows((DOCS / "api.md").read_text(), "## Errors")
    documented = {int(status): set(re.findall(r"`(\w+)`", codes)) for status, codes, *_ in rows}
    assert documented == {status: set(codes) for status, codes in ERROR_CODES.items()}
    # What the OpenAPI tells clients (the statuses routes declare) is all among them.
    for name, schema in app.openapi()["components"]["schemas"].items():
        if re.fullmatch(r"Error\d+Info", name):
            code = schema["properties"]["code"]
            assert set(code.get("enum") or [code["const"]]) == documented[int(name[5:-4])], name


def routed(app, method: str, path: str) -> bool:
    concrete = re.sub(r"\{[^}]*\}", "0", path)
    scope = {"type": "http", "method": method, "path": concrete, "root_path": "", "headers": []}
    return any(route.matches(scope)[0] == Match.FULL for route in app.router.routes)


def test_documented_requests_are_routed(app):
    requests = {(page.name, method, path) for page in [*PAGES, README]
                for method, path in re.findall(r"`(GET|POST|PUT|PATCH|DELETE) (/[^`\s?]*)", page.read_text())}
    assert len(requests) > 20
    unrouted = sorted(request for request in requests if not routed(app, *request[1:]))
    assert not unrouted, f"requests the docs name that the app does not route: {unrouted}"
    assert not routed(app, "POST", "/v1/none") and not routed(app, "GET", "/v1/encode")


def slug(heading: str) -> str:
    """The anchor mkdocs' toc extension gives a heading."""
    return re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", heading).strip().lower())


def test_readme_is_a_landing_page_whose_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    for target, anchor in re.findall(r"\]\((?!https?:)([^)#\s]+)(?:#([^)\s]+))?\)", text):
        path = ROOT / target
        assert path.is_file(), f"README links to {target}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", path.read_text(), re.M)
            assert anchor in {slug(h) for h in headings}, f"README links to {target}#{anchor}: no such heading"
    assert "docs/architecture.md" in text.split("\n## ", 1)[0], "the architecture link belongs above the fold"


def test_ci_runs_the_test_command_the_readme_states():
    section = README.read_text().split("## Set up and run the tests\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)\n```", section, re.S)
    assert blocks[0] == ".ci/run"
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert blocks[-1] == ci[-1]

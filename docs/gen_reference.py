"""The reference sections of the docs, generated from the code so they cannot drift from it:
the settings table of docs/settings.md from `service.settings.Settings` (each field's
description is the setting's documentation), and the operations table of docs/api.md from
the app's OpenAPI schema.

    python docs/gen_reference.py           # rewrite the generated blocks
    python docs/gen_reference.py --check   # exit 1 naming the pages out of date

A block is the text between `<!-- generated: NAME -->` and `<!-- end generated -->`; the
rest of each page is written by hand. tests/test_docs.py fails while a page is out of date.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BLOCK = re.compile(r"(<!-- generated: (\w+) -->\n).*?(<!-- end generated -->)", re.S)
METHODS = ("get", "post", "put", "patch", "delete")

sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the repository's packages

from service.app import create_app  # noqa: E402
from service.settings import Settings  # noqa: E402


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def default_text(value) -> str:
    if value is None or value == ():
        return "unset"
    if isinstance(value, Path):
        value = value.relative_to(ROOT) if value.is_relative_to(ROOT) else value
        value = value.as_posix()
    elif isinstance(value, float):
        value = f"{value:g}"
    return f"`{value}`"


def settings_table() -> str:
    names = Settings.env_names()
    rows = [f"| `{names[name]}` | {default_text(field.default)} | {cell(field.description or '')} |"
            for name, field in Settings.model_fields.items()]
    return "\n".join(["| variable | default | meaning |", "|---|---|---|", *rows])


def openapi() -> dict:
    # The defaults, whatever this shell's CDT_* variables say: the schema's shape does not
    # depend on them, and the page must not either.
    return create_app(Settings.model_construct()).openapi()


def status_key(status: str) -> tuple[int, str]:
    return (int(status), status) if status.isdigit() else (1000, status)


def api_table() -> str:
    rows = []
    for path, operations in openapi()["paths"].items():
        for method, operation in operations.items():
            if method not in METHODS:
                continue
            answers = ", ".join(sorted(operation["responses"], key=status_key))
            rows.append(f"| `{method.upper()} {path}` | `{operation['operationId']}` | "
                        f"{cell(operation.get('summary', ''))} | {answers} |")
    return "\n".join(["| operation | id | what | answers |", "|---|---|---|---|", *rows])


# Block name -> the page that holds it and what writes it.
BLOCKS = {"settings": ("settings.md", settings_table), "api": ("api.md", api_table)}


def render(text: str) -> str:
    """`text` with each generated block it holds written afresh."""
    return BLOCK.sub(lambda m: f"{m[1]}\n{BLOCKS[m[2]][1]()}\n\n{m[3]}", text)


def stale_pages() -> list[str]:
    """Pages whose generated blocks differ from what the code gives now."""
    pages = sorted({page for page, _ in BLOCKS.values()})
    return [page for page in pages if render((DOCS / page).read_text()) != (DOCS / page).read_text()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report the pages out of date")
    args = parser.parse_args()
    stale = stale_pages()
    if args.check:
        for page in stale:
            print(f"docs/{page} is out of date: run python docs/gen_reference.py", file=sys.stderr)
        return 1 if stale else 0
    for page in stale:
        path = DOCS / page
        path.write_text(render(path.read_text()))
        print(f"wrote docs/{page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

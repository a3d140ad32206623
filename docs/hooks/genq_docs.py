"""The MkDocs hook that makes genq's generated pages at build time, so that none can drift.

- The front page is `README.md` and the benchmarks page `bench/README.md` (with the pictures
  in `bench/results/`), their links rewritten to the site's pages (a link to any other file
  outside `docs/` becomes its text).
- The settings table replaces the `<!-- settings-table -->` marker of `docs/settings.md`: one row
  per `Settings` field (core/settings.py), its `GENQ_*` variable, type, default and bounds taken
  from the class, its meaning from the field's `description` or the comment block above it.
- The HTTP API reference (`reference/index.md`, `reference/schemas.md`) is rendered from the
  `/v1/openapi.json` the app serves, fetched offline with a Flask test client.

The settings table and the API reference are rendered by reference_pages.py (MkDocs puts this
folder on the import path while it loads the hook); this module rewrites links and hooks the
pages into the build. tests/test_docs.py builds the site in strict mode and checks the settings
table.
"""

from __future__ import annotations

import json
import posixpath
import re
from pathlib import Path
from typing import Any

from reference_pages import openapi_document, openapi_pages, settings_table

ROOT = Path(__file__).resolve().parents[2]
SETTINGS_MARKER = "<!-- settings-table -->"
# Repository files outside docs/ that have a page of their own on the site.
SITE_PAGES = {"README.md": "index.md", "bench/README.md": "benchmarks.md"}
# Pictures the benchmarks page shows, copied into the site under this folder.
BENCH_PICTURES = "bench/results"
SITE_PICTURES = "bench-results"
_LINK = re.compile(r"(!?)\[([^\]\n]+)\]\(([^)\s]+)\)")


# --- links -----------------------------------------------------------------------------------


def site_links(markdown: str, source: str) -> str:
    """`markdown`, read from the repository file `source`, with every relative link pointed at
    its page on the site: docs/x.md becomes x.md, README.md the front page, bench/README.md the
    benchmarks page; a link to any other file becomes its bare text (the site has no copy)."""
    here = posixpath.dirname(source)

    def rewrite(match: re.Match[str]) -> str:
        bang, text, target = match.groups()
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            return match.group(0)
        path, _, anchor = target.partition("#")
        repo_path = posixpath.normpath(posixpath.join(here, path))
        if repo_path in SITE_PAGES:
            page = SITE_PAGES[repo_path]
        elif posixpath.dirname(repo_path) == BENCH_PICTURES and repo_path.endswith(".png"):
            page = f"{SITE_PICTURES}/{posixpath.basename(repo_path)}"
        elif repo_path.startswith("docs/") and repo_path.endswith(".md"):
            page = repo_path.removeprefix("docs/")
        else:
            return text
        # Relative to the page that holds the link (index.md and benchmarks.md sit at the top).
        page_dir = posixpath.dirname(_page_of(source))
        link = posixpath.relpath(page, page_dir or ".")
        return f"{bang}[{text}]({link}{'#' + anchor if anchor else ''})"

    return _outside_code(markdown, lambda text: _LINK.sub(rewrite, text))


def _page_of(source: str) -> str:
    return SITE_PAGES.get(source) or source.removeprefix("docs/")


def _outside_code(markdown: str, change: Any) -> str:
    """Apply `change` to the text outside fenced code blocks."""
    parts = re.split(r"(^```.*?^```[^\n]*$)", markdown, flags=re.S | re.M)
    return "".join(part if i % 2 else change(part) for i, part in enumerate(parts))


# --- MkDocs events ---------------------------------------------------------------------------


def on_files(files: Any, config: Any) -> Any:
    """Add the pages made from outside `docs/`: the front page, benchmarks, API reference."""
    from mkdocs.structure.files import File

    made = {
        "index.md": site_links((ROOT / "README.md").read_text(), "README.md"),
        "benchmarks.md": site_links((ROOT / "bench/README.md").read_text(), "bench/README.md"),
    }
    document = openapi_document()
    made.update(openapi_pages(document))
    # The document itself beside its pages, for readers and tools that want the JSON.
    made["reference/openapi.json"] = json.dumps(document, indent=2) + "\n"
    for uri, content in made.items():
        if files.get_file_from_path(uri) is not None:
            files.remove(files.get_file_from_path(uri))
        files.append(File.generated(config, uri, content=content))
    for picture in sorted((ROOT / BENCH_PICTURES).glob("*.png")):
        uri = f"{SITE_PICTURES}/{picture.name}"
        files.append(File.generated(config, uri, abs_src_path=str(picture)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Point links that leave `docs/` at the site's pages, and fill in the settings table."""
    uri = page.file.src_uri
    if not page.file.generated_by:
        markdown = site_links(markdown, f"docs/{uri}")
    if SETTINGS_MARKER in markdown:
        markdown = markdown.replace(SETTINGS_MARKER, settings_table())
    return markdown

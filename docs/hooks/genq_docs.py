"""The MkDocs hook that makes genq's generated pages at build time, so that none can drift.

- The front page is `README.md` and the benchmarks page `bench/README.md` (with the pictures
  in `bench/results/`), their links rewritten to the site's pages (a link to any other file
  outside `docs/` becomes its text).
- The settings table replaces the `<!-- settings-table -->` marker of `docs/settings.md`: one row
  per `Settings` field (core/settings.py), its `GENQ_*` variable, type, default and bounds taken
  from the class, its meaning from the field's `description` or the comment block above it.
- The HTTP API reference (`reference/index.md`, `reference/schemas.md`) is rendered from the
  `/v1/openapi.json` the app serves, fetched offline with a Flask test client.

The links are site_markdown.py's, the settings table settings_reference.py's and the API
reference api_reference.py's; MkDocs puts this folder on the import path while it loads the hook.
tests/test_docs.py builds the site in strict mode and checks the settings table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from api_reference import openapi_document, openapi_pages
from settings_reference import settings_table
from site_markdown import BENCH_PICTURES, SITE_PICTURES, site_links

ROOT = Path(__file__).resolve().parents[2]
SETTINGS_MARKER = "<!-- settings-table -->"


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

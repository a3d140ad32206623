"""The Markdown of genq's docs site, as the hook (genq_docs.py) and the generated pages write
it: links in repository files pointed at their pages on the site (docs/x.md becomes x.md,
README.md the front page, bench/README.md the benchmarks page, any other file its bare text),
and text from a source (a docstring, the OpenAPI document) escaped as prose or as a table cell.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any

# Repository files outside docs/ that have a page of their own on the site.
SITE_PAGES = {"README.md": "index.md", "bench/README.md": "benchmarks.md"}
# Pictures the benchmarks page shows, copied into the site under this folder.
BENCH_PICTURES = "bench/results"
SITE_PICTURES = "bench-results"
_LINK = re.compile(r"(!?)\[([^\]\n]+)\]\(([^)\s]+)\)")


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


def prose(text: str) -> str:
    """Prose from the document, with `<` and `>` outside code shown as themselves (not HTML)."""
    parts = re.split(r"(`[^`]*`)", str(text))
    return "".join(
        p if i % 2 else p.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        for i, p in enumerate(parts)
    )


def cell(text: str) -> str:
    """`text` fit for a table cell: one line, pipes escaped outside code."""
    parts = re.split(r"(`[^`]*`)", prose(" ".join(str(text).split())))
    return "".join(p if i % 2 else p.replace("|", "\\|") for i, p in enumerate(parts))

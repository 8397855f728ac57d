"""MkDocs hooks: the pages built from the repository's other sources of truth.

- ``index.md`` is README.md, its links into ``docs/`` rewritten for the site (README links
  ``docs/admin.md``, the site ``admin.md``), so the front page exists once.
- ``<!-- settings-reference -->`` in a page becomes the table of every ``DJANGO_CFG_RPC`` key,
  generated from ``DjangoCfgRPCConfig`` (its fields, types, defaults and ``#:`` comments).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from docs_markup import settings_markdown

ROOT = Path(__file__).resolve().parents[2]
SETTINGS_MARKER = "<!-- settings-reference -->"
#: README links to these files; the site has them under other names.
SITE_PAGES = {"CHANGELOG.md": "changelog.md", "BENCHMARKS.md": "benchmarks.md"}
_INLINE_LINK = re.compile(r"(\]\()([^)\s]+)(\))")


def site_link(target: str) -> str:
    """A README link target as the site's front page needs it."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
        return target  # absolute URL or anchor on the same page
    path, hash_, anchor = target.partition("#")
    if path.startswith("docs/"):
        path = path.removeprefix("docs/")
    elif path in SITE_PAGES:
        path = SITE_PAGES[path]
    else:
        raise ValueError(
            f"README.md links to {target!r}, which the documentation site does not have: "
            "link a page under docs/ (or CHANGELOG.md, BENCHMARKS.md) instead."
        )
    return path + hash_ + anchor


def readme_as_index(readme: str) -> str:
    """README.md with every relative link pointing at the site's own pages."""
    return _INLINE_LINK.sub(lambda m: m.group(1) + site_link(m.group(2)) + m.group(3), readme)


def resolve_package_path(target: str) -> str | None:
    """Where a role in a ``#:`` comment points: our public objects by their dotted path.

    A path that does not exist stays a link, and the strict build fails on it. Other packages'
    objects and private ones are shown as code.
    """
    if target.split(".", 1)[0] != "django_rpc_audit" or any(
        part.startswith("_") and not part.startswith("__") for part in target.split(".")
    ):
        return None
    return target


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if page.file.src_uri == "index.md":
        markdown = readme_as_index((ROOT / "README.md").read_text(encoding="utf-8"))
    if SETTINGS_MARKER in markdown:
        markdown = markdown.replace(SETTINGS_MARKER, settings_markdown(resolve_package_path))
    return markdown

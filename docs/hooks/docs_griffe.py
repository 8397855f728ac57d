"""Griffe extension: the package's reST docstrings and ``#:`` comments, ready for mkdocstrings.

Loaded by path from ``mkdocs.yml`` (mkdocstrings' ``extensions`` option). Once the package is
loaded, every docstring is converted by ``docs_markup.rst_to_markdown``: Sphinx roles become
cross-references that the strict build checks, ``::`` blocks become code blocks. Attributes
documented by a ``#:`` comment (the settings' fields, module constants) get it as their
docstring.
"""

from __future__ import annotations

import builtins
import sys
from pathlib import Path
from typing import Any

import griffe

# Griffe loads this file by path; its sibling comes from the same folder.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_markup import comment_above, rst_to_markdown

Found = griffe.Object | griffe.Alias


def _lookup(scope: Found, dotted: str) -> Found | None:
    try:
        return scope.get_member(dotted)
    except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _is_private(path: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in path.split("."))


class ReSTDocstrings(griffe.Extension):
    """Convert docstrings to Markdown, resolving cross-references against the package."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        seen: set[int] = set()
        for obj in _walk(pkg):
            if isinstance(obj, griffe.Attribute) and obj.docstring is None:
                self._attach_doc_comment(obj)
            docstring = obj.docstring
            if docstring is None or id(docstring) in seen:
                continue
            seen.add(id(docstring))
            docstring.value = rst_to_markdown(docstring.value, _resolver(obj, loader))

    @staticmethod
    def _attach_doc_comment(attribute: griffe.Attribute) -> None:
        if attribute.lineno is None:
            return
        lines = attribute.module.lines
        if not lines or attribute.lineno > len(lines):
            return
        comment = comment_above(lines, attribute.lineno)
        if comment:
            attribute.docstring = griffe.Docstring(
                comment, lineno=attribute.lineno, parent=attribute
            )


def _walk(obj: griffe.Object) -> Any:
    yield obj
    for member in obj.members.values():
        if isinstance(member, griffe.Alias):
            continue
        yield from _walk(member)


def _resolver(obj: griffe.Object, loader: griffe.GriffeLoader) -> Any:
    """Where a role's target in ``obj``'s docstring points, or ``None`` (not documented)."""
    scopes: list[griffe.Object] = []
    current: griffe.Object | None = obj
    while current is not None:
        scopes.append(current)
        current = current.parent
    root = obj.package.name

    def resolve(target: str) -> str | None:
        found: Found | None = None
        head, _, rest = target.partition(".")
        if head == root:
            package = loader.modules_collection[root]
            found = _lookup(package, rest) if rest else package
        elif head in vars(builtins):
            return None  # ValueError, dict, ...: shown as code
        else:
            for scope in scopes:
                found = _lookup(scope, target)
                if found is not None:
                    break
        if found is None:
            # Another package's object (no inventory of it here: shown as code), or a name
            # that does not exist: left as a link, which fails the strict build.
            return None if "." in target and head != root else target
        # An imported name points at its definition: ours (documented there), or another
        # package's (shown as code).
        path = found.target_path if isinstance(found, griffe.Alias) else found.path
        if path.split(".", 1)[0] != root or _is_private(path):
            return None
        return path

    return resolve

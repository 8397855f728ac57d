"""Docs tooling: the package's reST docstrings as Markdown, and the settings reference.

Used at build time by ``docs_griffe.py`` (the API reference) and ``docs_pages.py`` (the
generated pages), and by ``tests/test_docs.py``. Standard library and ``django_rpc_audit``
only, so the tests run without the ``docs`` dependency group.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import textwrap
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: A Sphinx cross-reference role: ``:class:`~django_rpc_audit.client.RPCClient```.
ROLE = re.compile(r":(?:py:)?(?:class|func|meth|data|attr|mod|exc|obj|const):`(~?)([^`<>]+)`")

#: Turns a role's target (as written) into a full dotted path that the reference renders, or
#: ``None`` when the target is not documented there (then it is shown as code, not a link).
Resolver = Callable[[str], str | None]


def _role(match: re.Match[str], resolve: Resolver) -> str:
    short, target = match.group(1) == "~", match.group(2).strip()
    title = target.rsplit(".", 1)[-1] if short else target
    path = resolve(target)
    if path is None:
        return f"`{title}`"
    return f"[`{title}`][{path}]"


def roles_to_markdown(text: str, resolve: Resolver) -> str:
    """Replace every Sphinx role in ``text`` by a Markdown cross-reference (or code)."""
    return ROLE.sub(lambda match: _role(match, resolve), text)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _is_term(line: str) -> bool:
    """A line that can start a reST definition list item (not a field, list item or heading)."""
    stripped = line.strip()
    return bool(stripped) and not re.match(r"(:|[-*+] |\d+[.)] |>>>|[=\-~^]{3,}$)", stripped)


def rst_to_markdown(text: str, resolve: Resolver) -> str:
    """The reST subset our docstrings use, as Markdown.

    Roles become cross-references, ``::`` literal blocks become fenced code blocks (``python``
    when the block compiles), and definition lists (a term line with its indented definition
    right below) become Markdown definition lists. Field lists (``:raises X:``) are left to
    the docstring parser.
    """
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    after_definition = False
    while i < len(lines):
        line = lines[i]
        stripped = line.rstrip()
        if stripped.endswith("::"):
            head = stripped[:-2].rstrip()
            if head:
                out.append(roles_to_markdown(head + (":" if stripped[-3] != " " else ""), resolve))
            base = _indent(line)
            j = i + 1
            block: list[str] = []
            while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > base):
                block.append(lines[j])
                j += 1
            while block and not block[-1].strip():
                block.pop()
            code = textwrap.dedent("\n".join(block)).strip("\n")
            if code:
                out.extend(["", f"```{_language(code)}", *code.splitlines(), "```", ""])
                i = j
                continue
            i += 1
            continue
        starts_item = i == 0 or not lines[i - 1].strip() or after_definition
        after_definition = False
        if (
            starts_item
            and _is_term(line)
            and i + 1 < len(lines)
            and lines[i + 1].strip()
            and _indent(lines[i + 1]) > _indent(line)
            and not lines[i + 1].strip().startswith(":")
        ):
            base = _indent(lines[i + 1])
            definition: list[str] = []
            j = i + 1
            while j < len(lines) and lines[j].strip() and _indent(lines[j]) >= base:
                definition.append(lines[j].strip())
                j += 1
            out.append(roles_to_markdown(line.strip(), resolve))
            out.extend([":   " + roles_to_markdown(" ".join(definition), resolve), ""])
            after_definition = True
            i = j
            continue
        out.append(roles_to_markdown(line, resolve))
        i += 1
    return "\n".join(out)


def _language(code: str) -> str:
    try:
        compile(code, "<docstring>", "exec")
    except SyntaxError:
        return ""
    return "python"


# -- The settings reference -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setting:
    """One key of ``DJANGO_CFG_RPC``, as the settings reference shows it."""

    key: str
    group: str
    type: str
    default: str
    environment: str
    meaning: str


def comment_above(lines: list[str], lineno: int) -> str | None:
    """The ``#:`` doc comment right above line ``lineno`` (1-based) of ``lines``, joined.

    As Sphinx reads them: only ``#:`` lines directly above the assignment, at its indentation.
    """
    indent = _indent(lines[lineno - 1])
    found: list[str] = []
    number = lineno - 2
    while number >= 0:
        line = lines[number]
        if not line.lstrip().startswith("#:") or _indent(line) != indent:
            break
        found.append(line.strip()[2:].strip())
        number -= 1
    return " ".join(reversed(found)) or None


def _class_fields(source: str, class_name: str) -> list[ast.AnnAssign]:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return [
                statement
                for statement in node.body
                if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
            ]
    raise LookupError(f"No class {class_name} in the source.")


def doc_comments(source: str, class_name: str) -> dict[str, str]:
    """The ``#:`` doc comment of each annotated field of ``class_name`` in ``source``.

    A field with no ``#:`` line directly above it gets no entry.
    """
    lines = source.splitlines()
    return {
        statement.target.id: comment  # type: ignore[union-attr]
        for statement in _class_fields(source, class_name)
        if (comment := comment_above(lines, statement.lineno)) is not None
    }


#: ``# -- data hygiene`` above a run of fields names their group.
GROUP_COMMENT = re.compile(r"^\s*# -- (.+?)\s*$")


def field_groups(source: str, class_name: str, first: str = "General") -> dict[str, str]:
    """The group of each field: the last ``# -- <group>`` comment above it (else ``first``)."""
    lines = source.splitlines()
    groups: dict[str, str] = {}
    group, seen = first, 0
    for statement in _class_fields(source, class_name):
        for line in lines[seen : statement.lineno - 1]:
            match = GROUP_COMMENT.match(line)
            if match:
                group = match.group(1)[0].upper() + match.group(1)[1:]
        groups[statement.target.id] = group  # type: ignore[union-attr]
        seen = statement.end_lineno or statement.lineno
    return groups


def config_fields() -> list[dataclasses.Field[Any]]:
    """The fields of :class:`~django_rpc_audit.conf.DjangoCfgRPCConfig`, in source order."""
    from django_rpc_audit.conf import DjangoCfgRPCConfig

    return list(dataclasses.fields(DjangoCfgRPCConfig))


def _config_source() -> str:
    from django_rpc_audit import conf

    return Path(conf.__file__).read_text(encoding="utf-8")


def config_comments() -> dict[str, str]:
    """The ``#:`` doc comment of every field of ``DjangoCfgRPCConfig`` that has one."""
    return doc_comments(_config_source(), "DjangoCfgRPCConfig")


def _type_name(hint: Any) -> str:
    """A field's type as a settings author writes the value (lists and dicts, not tuples)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return " or ".join(f'`"{arg}"`' if isinstance(arg, str) else f"`{arg!r}`" for arg in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        item = args[0]
        if typing.get_origin(item) is tuple and len(typing.get_args(item)) == 2:
            key, value = typing.get_args(item)
            # Rules normalised from the dicts the settings give are read as dicts.
            if isinstance(value, types.UnionType):  # prices or dotted paths (COSTS)
                value_name = " or ".join(_type_name(arg) for arg in typing.get_args(value))
            else:
                value_name = _type_name(value) if value in (str, int, float, bool) else "dict"
            return f"dict of {_type_name(key)} to {value_name}"
        return f"list of {_type_name(item)}"
    if isinstance(hint, type):
        return {"str": "str", "int": "int", "float": "float", "bool": "bool"}.get(
            hint.__name__, f"`{hint.__name__}`"
        )
    return f"`{hint}`"


def _default(field: dataclasses.Field[Any]) -> str:
    value = field.default
    if value == () and "dict of" in _type_name(_hints()[field.name]):
        return "`{}`"
    if value == ():
        return "`[]`"
    if isinstance(value, float | int) and not isinstance(value, bool):
        return f"`{value:_}`".replace("_", ",") if abs(value) >= 10_000 else f"`{value!r}`"
    return f"`{value!r}`".replace("'", '"')


def _hints() -> dict[str, Any]:
    from django_rpc_audit.conf import DjangoCfgRPCConfig

    return typing.get_type_hints(DjangoCfgRPCConfig)


def settings_reference(resolve: Resolver) -> list[Setting]:
    """One :class:`Setting` per config field, in the order ``conf.py`` declares them."""
    from django_rpc_audit.conf import ENV_PREFIX

    comments = config_comments()
    groups = field_groups(_config_source(), "DjangoCfgRPCConfig")
    hints = _hints()
    return [
        Setting(
            key=field.name.upper(),
            group=groups[field.name],
            type=_type_name(hints[field.name]),
            default=_default(field),
            environment=f"`{ENV_PREFIX}{field.name.upper()}`",
            meaning=roles_to_markdown(comments.get(field.name, ""), resolve),
        )
        for field in config_fields()
    ]


def settings_markdown(resolve: Resolver) -> str:
    """The settings reference: a section per group, a heading per key (anchor: its name)."""
    out: list[str] = []
    group = None
    for setting in settings_reference(resolve):
        if setting.group != group:
            group = setting.group
            out += [f"## {group}", ""]
        out += [
            f"### `{setting.key}` {{#{setting.key.lower()}}}",
            "",
            f"**Type** {setting.type} · **Default** {setting.default} · "
            f"**Environment** {setting.environment}",
            "",
            setting.meaning,
            "",
        ]
    return "\n".join(out)

"""The settings page's table (docs/settings.md's `<!-- settings-table -->` marker): one row per
`Settings` field (core/settings.py), its `GENQ_*` variable, type, default and bounds taken from
the class, its meaning from the field's `description` or the comment block above it. A field
with neither stops the build: every setting is documented.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import typing
from pathlib import Path
from typing import Any

import annotated_types
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from site_markdown import cell


def settings_rows(settings_class: type | None = None) -> list[dict[str, Any]]:
    """One entry per group of `Settings` fields that share a description, in the class's
    order: `names` (the fields), `variables`, `types`, `defaults`, `bounds`, `description`.
    A field with no description stops the build: every setting is documented."""
    from core.settings import Settings

    cls: Any = settings_class or Settings
    prefix = str(cls.model_config.get("env_prefix", ""))
    descriptions = field_comments(cls)
    groups: list[dict[str, Any]] = []
    for name, field in cls.model_fields.items():
        text = field.description or descriptions.get(name)
        if text is None:
            raise ValueError(f"{cls.__name__}.{name} has no description: give it a comment")
        if groups and groups[-1]["description"] == text and not field.description:
            group = groups[-1]
        else:
            group = {"names": [], "variables": [], "types": [], "defaults": [], "bounds": []}
            group["description"] = text
            groups.append(group)
        group["names"].append(name)
        group["variables"].append((prefix + name).upper())
        group["types"].append(_type_name(field.annotation))
        group["defaults"].append(_default(name, field))
        group["bounds"].append(_bounds(field))
    return groups


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment block: the `#` lines right above it, or, for a field with none,
    the block of the field on the line above it (a block describes the fields under it up to
    a blank line or the next comment)."""
    lines, _ = inspect.getsourcelines(cls)
    tree = ast.parse(textwrap.dedent("".join(lines)))
    body = tree.body[0]
    assert isinstance(body, ast.ClassDef)
    found: dict[str, str] = {}
    previous: tuple[int, str | None] | None = None
    for node in body.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            previous = None
            continue
        comment: list[str] = []
        row = node.lineno - 2
        while row >= 0 and lines[row].strip().startswith("#"):
            comment.insert(0, lines[row].strip().lstrip("#").strip())
            row -= 1
        text: str | None = " ".join(comment) or None
        if text is None and previous is not None and previous[0] == node.lineno - 1:
            text = previous[1]
        if text is not None:
            found[node.target.id] = text
        previous = (node.end_lineno or node.lineno, None if _has_description(node) else text)
    return found


def _has_description(node: ast.AnnAssign) -> bool:
    call = node.value
    return isinstance(call, ast.Call) and any(k.arg == "description" for k in call.keywords)


def _type_name(annotation: Any) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return " or ".join(f"`{a}`" for a in typing.get_args(annotation))
    if args and typing.get_origin(annotation) is not typing.Literal:
        return " or ".join(_type_name(a) for a in args)
    names = {str: "text", int: "integer", float: "number", bool: "`true` or `false`", Path: "path"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _default(name: str, field: FieldInfo) -> str:
    value = field.default
    if value is PydanticUndefined or value is None or value == "":
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    shown = f"`{value}`"
    if name.endswith("_bytes") and isinstance(value, int) and value >= 1024:
        shown += f" ({_binary_size(value)})"
    return shown


def _binary_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or size % 1024:
            return f"{size:,} {unit}"
        size //= 1024
    return f"{size:,} PiB"


def _bounds(field: FieldInfo) -> str:
    shown: list[str] = []
    for rule in field.metadata:
        for attribute, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if isinstance(rule, getattr(annotated_types, attribute.capitalize())):
                number = getattr(rule, attribute)
                if isinstance(number, float) and number.is_integer():
                    number = int(number)
                shown.append(
                    f"{sign} {number:,}" if isinstance(number, int) else f"{sign} {number}"
                )
        if isinstance(rule, annotated_types.MinLen):
            shown.append(f"at least {rule.min_length} characters")
        pattern = getattr(rule, "pattern", None)
        if isinstance(pattern, str):
            shown.append(f"matches `{pattern}`")
    return ", ".join(shown)


def settings_table() -> str:
    """The settings page's table in Markdown."""
    out = ["| variable | type | default | bounds | meaning |", "|---|---|---|---|---|"]
    for group in settings_rows():
        cells = [
            "<br>".join(f"`{v}`" for v in group["variables"]),
            "<br>".join(group["types"]),
            "<br>".join(group["defaults"]),
            "<br>".join(b or "—" for b in group["bounds"]),
            cell(group["description"]),
        ]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"

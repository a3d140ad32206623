"""The reference pages genq's docs site generates from the code, so that none can drift: the
settings table (docs/settings.md's `<!-- settings-table -->` marker: one row per `Settings` field
of core/settings.py, its `GENQ_*` variable, type, default and bounds taken from the class, its
meaning from the field's `description` or the comment block above it; a field with neither
stops the build) and the HTTP API reference (`reference/index.md`, `reference/schemas.md`),
rendered from the `/v1/openapi.json` the app serves, fetched offline with a Flask test client
from an app built with no GENQ_* variable of the machine that builds the docs. The hook
(genq_docs.py) adds them to the site.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import json
import os
import re
import tempfile
import textwrap
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import annotated_types
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

# --- settings --------------------------------------------------------------------------------


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
            _cell(group["description"]),
        ]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


# --- the HTTP API reference ------------------------------------------------------------------


@contextlib.contextmanager
def _without_genq_environment() -> Iterator[None]:
    """The document must not depend on the machine that builds the docs: GENQ_* variables are
    hidden while the app is built (and the database is a throwaway SQLite file)."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("GENQ_")}
    for key in saved:
        del os.environ[key]
    try:
        yield
    finally:
        os.environ.update(saved)


def openapi_document() -> dict[str, Any]:
    """The document `GET /v1/openapi.json` serves, from an app built here (no server, no
    network: a Flask test client asks it)."""
    from api.app import create_app
    from core.settings import Settings

    with _without_genq_environment(), tempfile.TemporaryDirectory() as folder:
        settings = Settings(_env_file=None, var_dir=Path(folder))  # type: ignore[call-arg]
        app = create_app(settings)
        answer = app.test_client().get("/v1/openapi.json")
        if answer.status_code != 200:
            raise RuntimeError(f"GET /v1/openapi.json answered {answer.status_code}")
        document: dict[str, Any] = json.loads(answer.get_data(as_text=True))
        return document


METHODS = ("get", "post", "put", "patch", "delete")


def openapi_pages(doc: dict[str, Any]) -> dict[str, str]:
    """The reference pages of `doc`: operations grouped by their first path segment
    (`reference/index.md`) and the component schemas (`reference/schemas.md`)."""
    schemas: dict[str, Any] = doc.get("components", {}).get("schemas", {})
    groups: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for path, item in doc.get("paths", {}).items():
        for method in METHODS:
            if method in item:
                groups.setdefault(_group_of(path), []).append((method, path, item))
    info = doc.get("info", {})
    out = [
        "# HTTP API reference",
        "",
        f"Rendered from the OpenAPI {doc.get('openapi', '')} document that the API serves at "
        "`GET /v1/openapi.json` (no key needed), when this site was built: the document is the "
        "contract, this page a reading of it ([the document as built](openapi.json)). "
        f"{_text(info.get('description', ''))} "
        "Conventions (keys, errors, limits) are in the [API overview](../api.md); the bodies' "
        "shapes are on the [schemas](schemas.md) page.",
        "",
    ]
    for group in sorted(groups):
        out += [f"## {group}", ""]
        for method, path, item in groups[group]:
            out += _operation(method, path, item, doc)
    lines = [
        "# Schemas",
        "",
        "The component schemas of `GET /v1/openapi.json`, in alphabetical order; the "
        "[operations](index.md) link here.",
        "",
    ]
    for name in sorted(schemas, key=str.lower):
        lines += _schema_section(name, schemas[name], schemas)
    return {"reference/index.md": "\n".join(out), "reference/schemas.md": "\n".join(lines)}


def _group_of(path: str) -> str:
    parts = [p for p in path.split("/") if p and p != "v1" and not p.startswith("{")]
    return parts[0] if parts else "/"


def _resolve(node: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    seen = 0
    while "$ref" in node and node["$ref"].startswith("#/components/") and seen < 10:
        _, _, kind, name = node["$ref"].split("/", 3)
        if kind == "schemas":
            break
        node = doc["components"][kind][name]
        seen += 1
    return node


def _operation(method: str, path: str, item: dict[str, Any], doc: dict[str, Any]) -> list[str]:
    op = item[method]
    op_anchor = anchor(op.get("operationId") or f"{method}-{path}")
    out = [f"### {method.upper()} `{path}` {{#{op_anchor}}}", ""]
    if op.get("summary"):
        out += [_text(op["summary"]) + ".", ""]
    if op.get("description"):
        out += [_text(op["description"]), ""]
    if not op.get("security", doc.get("security")):
        out += ["No API key needed.", ""]
    parameters = [_resolve(p, doc) for p in item.get("parameters", []) + op.get("parameters", [])]
    if parameters:
        out += ["| parameter | in | type | required | meaning |", "|---|---|---|---|---|"]
        for p in parameters:
            schema = p.get("schema", {})
            meaning = _join(p.get("description", ""), _constraints(schema))
            out.append(
                f"| `{p['name']}` | {p.get('in', '')} | {_type(schema)} | "
                f"{'yes' if p.get('required') else 'no'} | {_cell(meaning)} |"
            )
        out.append("")
    body = op.get("requestBody")
    if body:
        body = _resolve(body, doc)
        for media, content in body.get("content", {}).items():
            schema = content.get("schema", {})
            out += [f"Body (`{media}`): {_type(schema)}.", ""]
            if "$ref" not in schema and schema.get("properties"):
                out += _fields(schema, here=False)
    responses = op.get("responses", {})
    if responses:
        out += ["| answer | meaning | body |", "|---|---|---|"]
        for status in sorted(responses):
            answer = _resolve(responses[status], doc)
            kinds = [
                f"`{media}` {_type(c['schema'])}" if c.get("schema") else f"`{media}`"
                for media, c in answer.get("content", {}).items()
            ]
            out.append(
                f"| {status} | {_cell(answer.get('description', ''))} | {_cell(', '.join(kinds))} |"
            )
        out.append("")
    return out


def _schema_section(name: str, schema: dict[str, Any], schemas: dict[str, Any]) -> list[str]:
    out = [f"## {name} {{#{anchor(name)}}}", ""]
    if schema.get("description"):
        out += [_text(schema["description"]), ""]
    properties: dict[str, Any] = schema.get("properties", {})
    if not properties:
        extra = _constraints(schema)
        out += [f"{_type(schema, here=True)}{'; ' + extra if extra else ''}.", ""]
        return out
    return out + _fields(schema, here=True)


def _fields(schema: dict[str, Any], here: bool) -> list[str]:
    """The table of an object schema's fields."""
    required = set(schema.get("required", []))
    out = ["| field | type | required | meaning |", "|---|---|---|---|"]
    for field, sub in schema.get("properties", {}).items():
        meaning = _join(sub.get("description", ""), _constraints(sub))
        out.append(
            f"| `{field}` | {_type(sub, here)} | {'yes' if field in required else 'no'} "
            f"| {_cell(meaning)} |"
        )
    out.append("")
    if schema.get("additionalProperties") is False:
        out += ["No other field is accepted.", ""]
    return out


def _type(schema: dict[str, Any], here: bool = False) -> str:
    """A schema as a short phrase, a `$ref` as a link to its section."""
    if not isinstance(schema, dict) or not schema:
        return "any"
    if "$ref" in schema:
        ref = str(schema["$ref"])
        name = ref.rsplit("/", 1)[-1]
        if not ref.startswith("#/components/schemas/"):
            return f"`{name}`"
        return f"[{name}]({'' if here else 'schemas.md'}#{anchor(name)})"
    for key, word in (("oneOf", " or "), ("anyOf", " or "), ("allOf", " and ")):
        if key in schema:
            return word.join(_type(s, here) for s in schema[key])
    if "const" in schema:
        return f"`{json.dumps(schema['const'])}`"
    if "enum" in schema:
        return "one of " + ", ".join(f"`{json.dumps(v)}`" for v in schema["enum"])
    kind = schema.get("type")
    if isinstance(kind, list):
        return " or ".join(_type({**schema, "type": k}, here) for k in kind)
    if kind == "array":
        return f"array of {_type(schema.get('items', {}), here)}"
    if kind == "object":
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict) and extra:
            return f"object of {_type(extra, here)}"
        return "object"
    if kind == "string" and schema.get("format"):
        return f"string ({schema['format']})"
    return str(kind) if kind else "any"


def _constraints(schema: dict[str, Any]) -> str:
    if not isinstance(schema, dict):
        return ""
    words = {
        "minimum": "≥ {}",
        "exclusiveMinimum": "> {}",
        "maximum": "≤ {}",
        "exclusiveMaximum": "< {}",
        "minLength": "length ≥ {}",
        "maxLength": "length ≤ {}",
        "minItems": "items ≥ {}",
        "maxItems": "items ≤ {}",
        "pattern": "matches `{}`",
        "default": "default `{}`",
    }
    shown = []
    for key, word in words.items():
        if key in schema:
            value = schema[key]
            shown.append(word.format(json.dumps(value) if key == "default" else value))
    return ", ".join(shown)


def _join(*parts: str) -> str:
    text = " ".join(p.strip() for p in parts if p and p.strip())
    return text


def anchor(name: str) -> str:
    """An HTML id for a schema or operation name (generated names may hold `[`, `.` or `/`)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")


# --- Markdown text ---------------------------------------------------------------------------


def _text(text: str) -> str:
    """Prose from the document, with `<` and `>` outside code shown as themselves (not HTML)."""
    parts = re.split(r"(`[^`]*`)", str(text))
    return "".join(
        p if i % 2 else p.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        for i, p in enumerate(parts)
    )


def _cell(text: str) -> str:
    """`text` fit for a table cell: one line, pipes escaped outside code."""
    parts = re.split(r"(`[^`]*`)", _text(" ".join(str(text).split())))
    return "".join(p if i % 2 else p.replace("|", "\\|") for i, p in enumerate(parts))

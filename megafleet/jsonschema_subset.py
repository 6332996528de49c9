"""A small JSON Schema validator for the subset of draft 2020-12 our shipped schemas use.

The operator validates documents that nodes send back (the environment check's report) without
depending on `jsonschema` and its compiled dependencies. Supported keywords are listed in
`SUPPORTED_KEYWORDS`; a schema using any other keyword is refused (`unsupported_keywords`), so a
schema can never silently ask for a rule this module does not enforce. The tests compare its
verdicts with the `jsonschema` package on valid and broken documents.
"""

from __future__ import annotations

import re
from typing import Any, Iterator

SUPPORTED_KEYWORDS = frozenset(
    {
        "$schema",
        "$id",
        "$defs",
        "$ref",
        "title",
        "description",
        "type",
        "enum",
        "const",
        "required",
        "properties",
        "additionalProperties",
        "items",
        "pattern",
        "minimum",
    }
)

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "null": lambda v: v is None,
}


def unsupported_keywords(schema: Any, path: str = "#") -> list[str]:
    """Keywords in `schema` this validator does not implement, as `path: keyword`."""
    found = []
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key not in SUPPORTED_KEYWORDS:
                found.append(f"{path}: {key}")
            if key in ("properties", "$defs"):
                for name, sub in value.items():
                    found.extend(unsupported_keywords(sub, f"{path}/{key}/{name}"))
            elif key in ("items", "additionalProperties") and isinstance(value, dict):
                found.extend(unsupported_keywords(value, f"{path}/{key}"))
    return found


def iter_errors(
    instance: Any, schema: dict, root: dict | None = None, path: str = ""
) -> Iterator[tuple[str, str]]:
    """Yield (dotted path, message) for every violation of `schema` by `instance`."""
    root = schema if root is None else root
    if "$ref" in schema:
        yield from iter_errors(instance, _resolve(root, schema["$ref"]), root, path)
        return
    where = path or "(document)"
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[t](instance) for t in types):
            yield where, f"expected {' or '.join(types)}, got {_describe(instance)}"
            return
    if "const" in schema and instance != schema["const"]:
        yield where, f"must be {schema['const']!r}, got {instance!r}"
    if "enum" in schema and not any(_same(instance, e) for e in schema["enum"]):
        yield where, f"{instance!r} is not one of {', '.join(repr(e) for e in schema['enum'])}"
    pattern = schema.get("pattern")
    if isinstance(instance, str) and pattern and not re.search(pattern, instance):
        yield where, f"{instance!r} does not match {schema['pattern']}"
    if _TYPES["number"](instance) and "minimum" in schema and instance < schema["minimum"]:
        yield where, f"{instance} is below the minimum {schema['minimum']}"
    if isinstance(instance, dict):
        yield from _object_errors(instance, schema, root, path)
    if isinstance(instance, list) and "items" in schema:
        for i, item in enumerate(instance):
            yield from iter_errors(item, schema["items"], root, f"{path}[{i}]")


def _object_errors(instance: dict, schema: dict, root: dict, path: str):
    props = schema.get("properties", {})
    for name in schema.get("required", []):
        if name not in instance:
            yield _join(path, name), "is required but missing"
    extra = schema.get("additionalProperties", True)
    for name, value in instance.items():
        sub_path = _join(path, name)
        if name in props:
            yield from iter_errors(value, props[name], root, sub_path)
        elif extra is False:
            yield sub_path, "is not an allowed field"
        elif isinstance(extra, dict):
            yield from iter_errors(value, extra, root, sub_path)


def _resolve(root: dict, ref: str) -> dict:
    if not ref.startswith("#/"):
        raise ValueError(f"only local $ref is supported, got {ref}")
    node: Any = root
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def _same(a: Any, b: Any) -> bool:
    # JSON Schema equality: 1 == true is false, 1 == 1.0 is true.
    return type(a) is type(b) and a == b or (_TYPES["number"](a) and _TYPES["number"](b) and a == b)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
        type(value), type(value).__name__
    )

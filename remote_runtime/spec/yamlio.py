"""YAML reading that remembers where each key was, so errors can name the file line.

Torch-free; used by the job config loader and the operator's host inventory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class YamlSyntaxError(ValueError):
    def __init__(self, path: str, line: int | None, message: str):
        self.path, self.line = path, line
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {message}")


def load_with_lines(path: str | Path) -> tuple[Any, dict[str, int]]:
    """Parse a YAML file; return (data, {dotted.key.path: 1-based line}).

    List items are addressed by index (`hosts.2.port`). Syntax errors raise YamlSyntaxError
    with the line of the problem.
    """
    text = Path(path).read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise YamlSyntaxError(str(path), line, (exc.problem or str(exc)).strip()) from None
    lines: dict[str, int] = {}
    if node is not None:
        _walk(node, "", lines)
    return data, lines


def _walk(node: yaml.Node, prefix: str, lines: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            lines[key] = key_node.start_mark.line + 1
            _walk(value_node, key, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            key = f"{prefix}.{i}" if prefix else str(i)
            lines[key] = item.start_mark.line + 1
            _walk(item, key, lines)

"""Row formats: detect one per file, validate each row, turn it into chat messages or text.

Formats (the ms-swift names in brackets):
  messages        {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  sharegpt        {"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...],
                   "system"?: str}
  alpaca          {"instruction": str, "input"?: str, "output": str, "system"?: str}
  query_response  {"query": str, "response": str, "history"?: [[query, response], ...],
                   "system"?: str}
  text            {"text": str}   (pre-training)

Preference formats (task `rlhf`), each giving a (chosen, rejected) pair of conversations that
share the prompt:
  preference_messages  {"messages": [..., {"role": "assistant", "content": chosen}],
                        "rejected_response": str}                          (ms-swift)
  preference_chat      {"chosen": [messages], "rejected": [messages]}, or with
                        "prompt": [messages] and the answers as assistant message lists (TRL)
  preference_text      {"prompt": str, "chosen": str, "rejected": str}   (a user turn and the
                        two assistant answers, rendered with the chat template as ms-swift does)

A chat row becomes a list of {"role", "content"} dicts; a text row a string. Problems raise
RowError with a message naming the field (callers add file and line).
"""

from __future__ import annotations

from remote_runtime.spec.errors import RowError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}
FORMATS = ("messages", "sharegpt", "alpaca", "query_response", "text")
PREFERENCE_FORMATS = ("preference_messages", "preference_chat", "preference_text")
_EXPECTED = (
    "expected one of: 'messages' (OpenAI style), 'conversations' (sharegpt), "
    "'instruction'+'output' (alpaca), 'query'+'response', 'text' (pre-training); "
    "preference pairs (rlhf): 'messages'+'rejected_response', 'chosen'+'rejected'"
)


def detect_format(row: object) -> str:
    """The format of a file, from the keys of its first row."""
    if not isinstance(row, dict):
        raise RowError(f"a row must be a JSON object, got {type(row).__name__}")
    if "rejected_response" in row and "messages" in row:
        return "preference_messages"
    if "chosen" in row and "rejected" in row:
        return "preference_text" if isinstance(row["chosen"], str) else "preference_chat"
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "query" in row and "response" in row:
        return "query_response"
    if "text" in row:
        return "text"
    raise RowError(f"cannot tell the row format from its keys {sorted(row)}; {_EXPECTED}")


def row_to_example(row: object, fmt: str) -> list[dict] | str | tuple[list[dict], list[dict]]:
    """Chat messages (every chat format), a string (text format) or a (chosen, rejected) pair
    of conversations (preference formats) for one row."""
    if not isinstance(row, dict):
        raise RowError(f"a row must be a JSON object, got {type(row).__name__}")
    if fmt in PREFERENCE_FORMATS:
        return _preference(row, fmt)
    if fmt == "text":
        return _string(row, "text")
    convert = {
        "messages": _messages,
        "sharegpt": _sharegpt,
        "alpaca": _alpaca,
        "query_response": _query_response,
    }[fmt]
    messages = convert(row)
    system = row.get("system")
    if system is not None and fmt in ("messages", "sharegpt"):
        system = _string(row, "system")
        if messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
    return messages


def _string(row: dict, key: str, where: str = "", optional: bool = False) -> str:
    if key not in row or row[key] is None:
        if optional:
            return ""
        raise RowError(f"missing field '{where}{key}'")
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"'{where}{key}' must be a string, got {type(value).__name__}")
    return value


def _content(value: object, where: str) -> str:
    """A message content: a string, or OpenAI-style text parts [{"type": "text", "text": ...}]."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in value
    ):
        return "".join(p["text"] for p in value)
    raise RowError(
        f"'{where}' must be a string (or a list of text parts), got "
        f"{type(value).__name__}; images, audio and tool calls are not supported"
    )


def _message_list(row: dict, key: str) -> list:
    if key not in row:
        raise RowError(f"missing field '{key}'")
    value = row[key]
    if not isinstance(value, list) or not value:
        raise RowError(f"'{key}' must be a non-empty list of messages, got {value!r:.40}")
    return value


def _messages(row: dict, key: str = "messages") -> list[dict]:
    out = []
    for i, msg in enumerate(_message_list(row, key)):
        where = f"{key}[{i}]"
        if not isinstance(msg, dict):
            raise RowError(f"'{where}' must be an object with 'role' and 'content'")
        role = msg.get("role")
        if role not in ROLES:
            raise RowError(f"'{where}.role' is {role!r}; allowed roles: {', '.join(ROLES)}")
        if "content" not in msg:
            raise RowError(f"missing field '{where}.content'")
        out.append({"role": role, "content": _content(msg["content"], f"{where}.content")})
    return out


def _sharegpt(row: dict) -> list[dict]:
    out = []
    for i, turn in enumerate(_message_list(row, "conversations")):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise RowError(f"'{where}' must be an object with 'from' and 'value'")
        speaker = turn.get("from", turn.get("role"))
        role = SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise RowError(f"'{where}.from' is {speaker!r}; allowed: {', '.join(SHAREGPT_ROLES)}")
        key = "value" if "value" in turn else "content"
        if key not in turn:
            raise RowError(f"missing field '{where}.value'")
        out.append({"role": role, "content": _content(turn[key], f"{where}.{key}")})
    return out


def _with_system(row: dict, turns: list[dict]) -> list[dict]:
    system = _string(row, "system", optional=True)
    return ([{"role": "system", "content": system}] if system else []) + turns


def _alpaca(row: dict) -> list[dict]:
    instruction = _string(row, "instruction")
    extra = _string(row, "input", optional=True)
    query = f"{instruction}\n{extra}" if extra else instruction
    return _with_system(
        row,
        [
            {"role": "user", "content": query},
            {"role": "assistant", "content": _string(row, "output")},
        ],
    )


def _query_response(row: dict) -> list[dict]:
    turns: list[dict] = []
    history = row.get("history") or []
    if not isinstance(history, list):
        raise RowError("'history' must be a list of [query, response] pairs")
    for i, pair in enumerate(history):
        if not (
            isinstance(pair, (list, tuple))
            and len(pair) == 2
            and all(isinstance(s, str) for s in pair)
        ):
            raise RowError(f"'history[{i}]' must be a [query, response] pair of strings")
        turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    turns += [
        {"role": "user", "content": _string(row, "query")},
        {"role": "assistant", "content": _string(row, "response")},
    ]
    return _with_system(row, turns)


# ---- preference pairs ----------------------------------------------------------------------


def _preference(row: dict, fmt: str) -> tuple[list[dict], list[dict]]:
    if fmt == "preference_messages":
        chosen = row_to_example(row, "messages")
        if chosen[-1]["role"] != "assistant":
            raise RowError("the last message of 'messages' must be the chosen assistant answer")
        rejected = chosen[:-1] + [
            {"role": "assistant", "content": _string(row, "rejected_response")}
        ]
        return chosen, rejected
    if fmt == "preference_text":
        prompt = _with_system(row, [{"role": "user", "content": _string(row, "prompt")}])
        return tuple(
            prompt + [{"role": "assistant", "content": _string(row, key)}]
            for key in ("chosen", "rejected")
        )
    prompt = _messages(row, "prompt") if "prompt" in row else []
    pair = []
    for key in ("chosen", "rejected"):
        turns = _messages(row, key)
        if turns[-1]["role"] != "assistant":
            raise RowError(f"the last message of '{key}' must be an assistant answer")
        pair.append(prompt + turns)
    if not prompt and pair[0][:-1] != pair[1][:-1]:
        raise RowError(
            "'chosen' and 'rejected' must share every message but the last "
            "(the prompt); put a shared prompt in 'prompt'"
        )
    system = row.get("system")
    if system is not None and pair[0][0]["role"] != "system":
        pair = [[{"role": "system", "content": _string(row, "system")}] + p for p in pair]
    return pair[0], pair[1]

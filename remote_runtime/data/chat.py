"""Chat template rendering and the assistant-token mask.

We render each conversation with the tokenizer's own chat template (`apply_chat_template`), as
the model will see it at inference, and train only on the assistant turns. Real templates are
not simple concatenations (Qwen2.5 adds a default system prompt, Qwen3 adds an empty think block
only to turns after the last user message and strips reasoning from earlier ones, Llama 3 trims
contents and adds a BOS token), so the loss spans are found on the rendered text:

- the span of assistant turn i starts where the rendering of messages[:i] with a generation
  prompt ends (when that rendering is a prefix of the full text), else where the turn's content
  appears in the full text;
- it ends after the turn's end-of-turn marker (`<|im_end|>`, `<|eot_id|>`), taken from the
  rendering of messages[:i+1]; the newline after the marker is not trained (at inference
  generation stops at the marker).

The full text is tokenized once and tokens are assigned to spans by character offsets, so the
ids equal `apply_chat_template(messages, tokenize=True)`'s exactly.
"""

from __future__ import annotations

import numpy as np

from remote_runtime.spec.errors import RowError


class ChatEncoder:
    """Turns chat messages or plain text into (input ids, loss mask) with one tokenizer."""

    def __init__(self, tokenizer, system: str | None = None):
        self.tokenizer = tokenizer
        self.system = system

    # ---- chat ---------------------------------------------------------------------------------
    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # jinja errors and the template's own raise_exception()
            raise RowError(
                f"the chat template failed on this conversation: {type(exc).__name__}: {exc}"
            ) from None

    def with_default_system(self, messages: list[dict]) -> list[dict]:
        if self.system and messages[0]["role"] != "system":
            return [{"role": "system", "content": self.system}] + messages
        return messages

    def encode_chat(
        self, messages: list[dict], train_all: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """ids (int32) and loss mask (uint8, 1 on assistant tokens; all ones with train_all)."""
        messages = self.with_default_system(messages)
        full = self.render(messages)
        spans = [(0, len(full))] if train_all else assistant_spans(self.render, messages, full)
        return self._tokenize_with_spans(full, spans)

    def _tokenize_with_spans(self, text: str, spans: list[tuple[int, int]]):
        try:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:  # a Python (non-`tokenizers`) tokenizer has no offsets
            return self._tokenize_segments(text, spans)
        ids = np.asarray(enc["input_ids"], dtype=np.int32)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        # A token belongs to the span holding its last character (zero-width tokens: their
        # position). A token that straddles the prompt/answer boundary is therefore trained,
        # which is what the model has to produce there.
        pos = np.where(offsets[:, 1] > offsets[:, 0], offsets[:, 1] - 1, offsets[:, 0])
        mask = np.zeros(len(ids), dtype=bool)
        for start, end in spans:
            mask |= (pos >= start) & (pos < end)
        return ids, mask.astype(np.uint8)

    def _tokenize_segments(self, text: str, spans: list[tuple[int, int]]):
        cuts = sorted({0, len(text), *[c for span in spans for c in span]})
        ids: list[int] = []
        mask: list[int] = []
        for a, b in zip(cuts, cuts[1:]):
            piece = self.tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
            inside = any(s <= a and b <= e for s, e in spans)
            ids += piece
            mask += [int(inside)] * len(piece)
        return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8)

    # ---- text (pre-training) ------------------------------------------------------------------
    def encode_text(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """text + EOS (plus BOS where the tokenizer adds one), every token trained."""
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise RowError("the tokenizer has no eos_token; pre-training appends it to each text")
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        if not ids or ids[-1] != eos:
            ids.append(eos)
        return np.asarray(ids, dtype=np.int32), np.ones(len(ids), dtype=np.uint8)


def assistant_spans(render, messages: list[dict], full: str) -> list[tuple[int, int]]:
    """Character spans of `full` (the rendered conversation) that belong to assistant turns."""
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        content = message["content"]
        head = render(messages[:i], add_generation_prompt=True) if i else ""
        upto = render(messages[: i + 1])
        start = len(head) if head and full.startswith(head) and len(head) >= cursor else None
        if full.startswith(upto) and len(upto) > (cursor if start is None else start):
            end = len(upto)
            if start is None:
                start = _find_turn(full, content, "", cursor, i)[0]
        else:  # the template renders this turn differently when it is not the last one
            found, end = _find_turn(
                full, content, _end_marker(upto, content), cursor if start is None else start, i
            )
            start = found if start is None else start
        end = start + len(full[start:end].rstrip())
        spans.append((start, end))
        cursor = end
    return spans


def _content_variants(content: str) -> list[str]:
    # Templates may trim the content or (Qwen3) drop the reasoning part of earlier turns.
    variants = [content, content.strip(), content.split("</think>")[-1].strip()]
    return [v for v in dict.fromkeys(variants) if v]


def _find_turn(
    full: str, content: str, marker: str, search_from: int, index: int
) -> tuple[int, int]:
    """(start, end) in `full` of assistant message `index`'s content followed by its end marker."""
    for variant in _content_variants(content) or [""]:
        pos = full.find(variant + marker, search_from)
        if pos >= 0:
            return pos, pos + len(variant) + len(marker)
    raise RowError(
        f"cannot find assistant message {index} in the text rendered by the chat "
        f"template (the template rewrites it); this chat template is not supported"
    )


def _end_marker(upto: str, content: str) -> str:
    """What the template writes after an assistant content (e.g. '<|im_end|>'), trailing space
    cut."""
    for variant in _content_variants(content):
        pos = upto.rfind(variant)
        if pos >= 0:
            return upto[pos + len(variant) :].rstrip()
    return ""


def preview(tokenizer, ids, mask) -> str:
    """Two lines showing a document as the model gets it and what it is trained on, e.g.

    [INPUT] <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello<|im_end|>\\n
    [TRAINED] [8 tokens not trained]Hello<|im_end|>[1 tokens not trained]
    """
    ids, mask = np.asarray(ids).tolist(), np.asarray(mask).tolist()
    parts, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            if mask[start]:
                parts.append(tokenizer.decode(ids[start:i]))
            else:
                parts.append(f"[{i - start} tokens not trained]")
            start = i
    return f"[INPUT] {tokenizer.decode(ids)!r}\n[TRAINED] {''.join(parts)!r}"

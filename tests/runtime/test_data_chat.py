"""Chat templates and the loss mask: exactly the assistant tokens, for each format and template."""

from __future__ import annotations

import numpy as np
import pytest
from data_fixtures import (
    LLAMA3_TEMPLATE,
    QWEN3_TEMPLATE,
    QWEN25_TEMPLATE,
    tokenizer,  # noqa: F401
    trained_runs,
    with_template,
)

from remote_runtime.data.chat import ChatEncoder
from remote_runtime.data.encode import EncodeSettings, encode_example
from remote_runtime.spec.errors import RowError
from remote_runtime.spec.formats import detect_format, row_to_example

pytestmark = pytest.mark.runtime

TWO_TURNS = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 = 4."},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "3 + 3 = 6."},
]

# The same one-turn chat in every format.
ONE_TURN_ROWS = [
    {
        "messages": [
            {"role": "user", "content": "What is the capital of Peru?"},
            {"role": "assistant", "content": "The capital of Peru is Lima."},
        ]
    },
    {
        "conversations": [
            {"from": "human", "value": "What is the capital of Peru?"},
            {"from": "gpt", "value": "The capital of Peru is Lima."},
        ]
    },
    {"instruction": "What is the capital of Peru?", "output": "The capital of Peru is Lima."},
    {"query": "What is the capital of Peru?", "response": "The capital of Peru is Lima."},
]


def encode_row(tok, row, system=None, task="sft"):
    example = row_to_example(row, detect_format(row))
    return encode_example(ChatEncoder(tok, system), example, EncodeSettings(task=task))


@pytest.mark.parametrize("row", ONE_TURN_ROWS, ids=lambda r: detect_format(r))
def test_mask_is_the_assistant_answer_and_end_token_in_every_format(tokenizer, row):
    ids, mask = encode_row(tokenizer, row)
    assert trained_runs(tokenizer, ids, mask) == ["The capital of Peru is Lima.<|im_end|>"]
    # The ids are exactly what the template gives when HF tokenizes it.
    messages = row_to_example(row, detect_format(row))
    ref = tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert ids.tolist() == list(ref)


def test_every_assistant_turn_is_trained(tokenizer):
    row = {"messages": TWO_TURNS}
    ids, mask = encode_row(tokenizer, row)
    assert trained_runs(tokenizer, ids, mask) == ["2 + 2 = 4.<|im_end|>", "3 + 3 = 6.<|im_end|>"]
    history = {
        "query": "And 3 + 3?",
        "response": "3 + 3 = 6.",
        "history": [["What is 2 + 2?", "2 + 2 = 4."]],
    }
    ids2, mask2 = encode_row(tokenizer, history)
    assert ids2.tolist() == ids.tolist() and mask2.tolist() == mask.tolist()


def test_default_system_applies_only_to_rows_without_one(tokenizer):
    ids, mask = encode_row(tokenizer, {"messages": TWO_TURNS[:2]}, system="Be brief.")
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user")
    assert trained_runs(tokenizer, ids, mask) == ["2 + 2 = 4.<|im_end|>"]
    own = {"messages": [{"role": "system", "content": "Own."}] + TWO_TURNS[:2]}
    text = tokenizer.decode(encode_row(tokenizer, own, system="Be brief.")[0])
    assert "Own." in text and "Be brief." not in text
    alpaca = {"instruction": "Hi", "output": "Hello", "system": "Row system."}
    assert "Row system." in tokenizer.decode(encode_row(tokenizer, alpaca, system="Be brief.")[0])


def test_rows_without_assistant_have_no_loss_tokens(tokenizer):
    ids, mask = encode_row(tokenizer, {"messages": [{"role": "user", "content": "Hi"}]})
    assert len(ids) > 0 and mask.sum() == 0


def test_pretraining_text_gets_eos_and_full_loss(tokenizer):
    ids, mask = encode_row(tokenizer, {"text": "The sun is near the moon."}, task="pt")
    assert ids[-1] == tokenizer.eos_token_id and mask.all()
    assert tokenizer.decode(ids[:-1]) == "The sun is near the moon."
    with pytest.raises(RowError, match="text rows are for pre-training"):
        encode_row(tokenizer, {"text": "x"}, task="sft")
    ids, mask = encode_row(tokenizer, {"messages": TWO_TURNS}, task="pt")
    assert mask.all()  # pt on chat rows: the rendered chat, every token trained


# ---- real-style templates ----------------------------------------------------------------------


def test_qwen25_template_default_system_is_not_trained(tokenizer):
    tok = with_template(tokenizer, QWEN25_TEMPLATE)
    ids, mask = encode_row(tok, {"messages": TWO_TURNS})
    assert tok.decode(ids).startswith("<|im_start|>system\nYou are Qwen")
    assert trained_runs(tok, ids, mask) == ["2 + 2 = 4.<|im_end|>", "3 + 3 = 6.<|im_end|>"]
    ids, _ = encode_row(tok, {"messages": TWO_TURNS}, system="Be brief.")
    assert "You are Qwen" not in tok.decode(ids) and "Be brief." in tok.decode(ids)


def test_qwen3_template_turns_rendered_differently_when_not_last(tokenizer):
    tok = with_template(tokenizer, QWEN3_TEMPLATE)
    ids, mask = encode_row(tok, {"messages": TWO_TURNS})
    assert ids.tolist() == list(tok.apply_chat_template(TWO_TURNS, tokenize=True)["input_ids"])
    # The first turn alone would get an empty think block; inside the chat it has none.
    assert trained_runs(tok, ids, mask) == [
        "2 + 2 = 4.<|im_end|>",
        "<think>\n\n</think>\n\n3 + 3 = 6.<|im_end|>",
    ]
    # Reasoning of an earlier turn is dropped by the template; the answer is still found.
    reasoning = [
        dict(TWO_TURNS[0]),
        {"role": "assistant", "content": "<think>\nadd\n</think>\n\n2 + 2 = 4."},
        *TWO_TURNS[2:],
    ]
    ids, mask = encode_row(tok, {"messages": reasoning})
    assert "add" not in tok.decode(ids)
    assert trained_runs(tok, ids, mask)[0] == "2 + 2 = 4.<|im_end|>"


def test_llama3_template_bos_trim_and_eot(tokenizer):
    tok = with_template(tokenizer, LLAMA3_TEMPLATE)
    padded = [dict(m, content=f"  {m['content']}  ") for m in TWO_TURNS]
    ids, mask = encode_row(tok, {"messages": padded})
    assert ids[0] == tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert ids.tolist() == list(tok.apply_chat_template(padded, tokenize=True)["input_ids"])
    assert trained_runs(tok, ids, mask) == ["2 + 2 = 4.<|eot_id|>", "3 + 3 = 6.<|eot_id|>"]


def test_template_that_rewrites_content_is_refused(tokenizer):
    # Rendering prefixes does not help here (the text starts with the message count), and the
    # content cannot be found either: refuse rather than train on the wrong tokens.
    tok = with_template(
        tokenizer,
        "{{ messages | length }}{% for m in messages %}{{ m.content | upper }}|{% endfor %}",
    )
    with pytest.raises(RowError, match="cannot find assistant message 1"):
        encode_row(tok, ONE_TURN_ROWS[0])


def test_template_errors_become_row_errors(tokenizer):
    tok = with_template(tokenizer, "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(RowError, match="roles must alternate"):
        encode_row(tok, {"messages": TWO_TURNS[:2]})


def test_python_tokenizer_fallback_tokenizes_segments(tokenizer):
    class NoOffsets:  # a tokenizer without offset mapping (a non-`tokenizers` backend)
        chat_template = tokenizer.chat_template
        eos_token_id = tokenizer.eos_token_id

        def apply_chat_template(self, *a, **k):
            return tokenizer.apply_chat_template(*a, **k)

        def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
            if return_offsets_mapping:
                raise NotImplementedError
            return tokenizer(text, add_special_tokens=add_special_tokens)

    ids, mask = ChatEncoder(NoOffsets()).encode_chat(TWO_TURNS)
    ref_ids, ref_mask = ChatEncoder(tokenizer).encode_chat(TWO_TURNS)
    assert np.array_equal(ids, ref_ids) and np.array_equal(mask, ref_mask)


def test_preview_shows_what_is_trained(tokenizer):
    from remote_runtime.data.chat import preview

    ids, mask = encode_row(tokenizer, ONE_TURN_ROWS[0])
    text = preview(tokenizer, ids, mask)
    assert text.startswith("[INPUT] '<|im_start|>user\\nWhat is the capital of Peru?")
    assert "tokens not trained]The capital of Peru is Lima.<|im_end|>[1 tokens not trained]" in text


def test_non_ascii_text_maps_to_the_right_tokens(tokenizer):
    # Byte-level BPE splits these characters over several tokens each; offsets are per character.
    row = {
        "messages": [
            {"role": "user", "content": "Où est Tōkyō? 東京"},
            {"role": "assistant", "content": "東京 est la capitale — café ☕"},
        ]
    }
    ids, mask = encode_row(tokenizer, row)
    assert trained_runs(tokenizer, ids, mask) == ["東京 est la capitale — café ☕<|im_end|>"]

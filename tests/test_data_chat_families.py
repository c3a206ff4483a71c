"""Reasoning and tool turns, token by token, for each template family (Llama-3.x, Qwen3/ChatML
with <think>, gpt-oss harmony): rendered with the model's template, loss only on assistant
output, tool results never trained, reasoning in the loss by default and out on request.

The oracle is the family's layout written out by hand as (text, trained?) pieces, each
tokenized alone; the ids must also equal the template's own tokenization.
"""

from __future__ import annotations

import pytest

from speculators.data.chat import Conversation, encode_conversations, encode_turn_rows
from speculators.tiny.families import HARMONY_SYSTEM, end_of_turn, family_tokenizer

from tests.support.chat_families import AGENT_CONV, TOOLS, tools_json

CALL = '{"city": "Paris"}'


def llama3_pieces(reasoning=True):
    h = lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n"  # noqa: E731
    return [
        ("<|begin_of_text|>" + h("system") + "Environment: ipython\nTools: " + tools_json() + "<|eot_id|>", 0),
        (h("system") + "Be brief.<|eot_id|>" + h("user") + "Weather in Paris?<|eot_id|>" + h("assistant"), 0),
        ('{"name": "get_weather", "parameters": ' + CALL + "}<|eot_id|>", 1),
        (h("ipython") + '{"temp": 21}<|eot_id|>' + h("assistant"), 0),  # the tool result: never trained
        ("It is 21 C in Paris.<|eot_id|>", 1),
        (h("user") + "Thanks<|eot_id|>" + h("assistant"), 0),
        ("You are welcome.<|eot_id|>", 1),  # Llama-3 has no reasoning field: nothing to render
    ]


def qwen3_pieces(reasoning=True):
    system = "<|im_start|>system\nBe brief.\n\n# Tools\n<tools>\n" + tools_json()[1:-1] + "\n</tools><|im_end|>\n"
    last = [("<think>\nSay welcome.\n</think>\n\nYou are welcome.<|im_end|>", 1)] if reasoning else [
        ("<think>\n", 1), ("Say welcome.", 0), ("\n</think>\n\nYou are welcome.<|im_end|>", 1)]
    return [
        (system + "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n", 0),
        # History turn (before the last user message): the template drops its reasoning.
        ('<tool_call>\n{"name": "get_weather", "arguments": ' + CALL + "}\n</tool_call><|im_end|>", 1),
        ("\n<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response><|im_end|>\n<|im_start|>assistant\n", 0),
        ("It is 21 C in Paris.<|im_end|>", 1),
        ("\n<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\n", 0),
        *last,
        ("\n", 0),  # after <|im_end|>: never generated
    ]


def harmony_pieces(reasoning=True):
    head = ("<|start|>system<|message|>" + HARMONY_SYSTEM + "<|end|><|start|>developer<|message|># Instructions\n"
            "Be brief.\n# Tools\n" + tools_json() + "<|end|><|start|>user<|message|>Weather in Paris?<|end|>")
    analysis = [("<|channel|>analysis<|message|>Say welcome.<|end|>", 1)] if reasoning else [
        ("<|channel|>analysis<|message|>", 1), ("Say welcome.", 0), ("<|end|>", 1)]
    return [
        (head + "<|start|>assistant", 0),
        ("<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>" + CALL + "<|call|>", 1),
        ("<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{\"temp\": 21}<|end|>", 0),
        # A history answer whose earlier context the template re-renders (the tool-call turn
        # loses its analysis once a later user message exists): found by content, so its
        # channel header stays context.
        ("<|start|>assistant<|channel|>final<|message|>", 0),
        ("It is 21 C in Paris.<|end|>", 1),
        ("<|start|>user<|message|>Thanks<|end|><|start|>assistant", 0),
        *analysis,
        ("<|start|>assistant<|channel|>final<|message|>You are welcome.<|return|>", 1),
    ]


PIECES = {"llama3": llama3_pieces, "qwen3": qwen3_pieces, "harmony": harmony_pieces}


def from_pieces(tok, pieces):
    ids, mask = [], []
    for text, flag in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [flag] * len(piece)
    return ids, mask


@pytest.fixture(scope="module", params=sorted(PIECES))
def family(request):
    return request.param, family_tokenizer(request.param)


@pytest.mark.parametrize("reasoning", [True, False])
def test_per_conversation_mask_token_by_token(family, reasoning):
    name, tok = family
    want_ids, want_mask = from_pieces(tok, PIECES[name](reasoning))
    [(ids, mask, truncated)] = encode_conversations(
        tok, [Conversation(AGENT_CONV, TOOLS)], end_of_turn(tok, name), train_reasoning=reasoning)
    assert ids == tok.apply_chat_template(AGENT_CONV, tools=TOOLS, tokenize=True, return_dict=False)
    assert ids == want_ids
    assert mask == want_mask, "\n".join(
        f"{i} {tok.convert_ids_to_tokens(t)!r} got {m} want {w}" for i, (t, m, w) in enumerate(zip(ids, mask, want_mask)) if m != w)
    assert not truncated


def test_per_turn_rows_token_by_token(family):
    """One row per assistant turn, each rendered as the last message: every turn's own
    reasoning is there (history reasoning the template drops is context only)."""
    name, tok = family
    eot = end_of_turn(tok, name)
    rows = encode_turn_rows(tok, Conversation(AGENT_CONV, TOOLS), eot, max_tokens=4096)
    assert len(rows) == 3
    for (ids, mask, truncated), j in zip(rows, (2, 4, 6)):
        prompt = tok.apply_chat_template(AGENT_CONV[:j], tools=TOOLS, add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(AGENT_CONV[: j + 1], tools=TOOLS, tokenize=False)
        assert full.startswith(prompt)
        answer = full[len(prompt):]
        closing = answer.rstrip("\n")  # ChatML's newline after <|im_end|> is not trained by default
        want_ids, want_mask = from_pieces(tok, [(prompt, 0), (closing, 1), (answer[len(closing):], 0)])
        assert (ids, mask) == (want_ids, want_mask) and not truncated
        trained = tok.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False)
        if name != "llama3":
            reasoning = AGENT_CONV[j]["reasoning_content"]
            assert reasoning in trained  # every turn's reasoning is trained in its own row
        assert "temp" not in trained  # tool results never
    # --train-after-end-of-turn: the public package's mask, trailing newline included.
    public_like = encode_turn_rows(tok, Conversation(AGENT_CONV, TOOLS), eot, 4096, train_after_end_of_turn=True)
    for (ids, mask, _), (_, ours, _) in zip(public_like, rows):
        first = mask.index(1)
        assert mask == [0] * first + [1] * (len(ids) - first)
        assert sum(mask) - sum(ours) == (1 if name == "qwen3" else 0)


def test_opening_assistant_turn_is_context():
    tok = family_tokenizer("qwen3")
    conv = [{"role": "assistant", "content": "Welcome!"}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}]
    [(ids, mask, _)] = encode_conversations(tok, [conv], end_of_turn(tok, "qwen3"))
    want_ids, want_mask = from_pieces(tok, [
        ("<|im_start|>assistant\nWelcome!<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", 0),
        ("<think>\n\n</think>\n\nHello.<|im_end|>", 1), ("\n", 0)])
    assert (ids, mask) == (want_ids, want_mask)

"""Chat templates of three verifier families for the tiny stand-ins, written from each format's facts.

Not copies of any model's template file: each renders the family's documented layout
(special tokens, role headers, where reasoning and tool calls go, what the generation
prompt is) in a few lines, with the behaviours that make loss masking hard:

* ``llama3`` (Llama-3.1 style): ``<|begin_of_text|>``, ``<|start_header_id|>ROLE<|end_header_id|>\\n\\n``
  headers, ``<|eot_id|>`` after every message; tool calls as a JSON object
  ``{"name", "parameters"}``; tool results under the ``ipython`` role; no reasoning.
* ``qwen3`` (ChatML with ``<think>``): ``<|im_start|>ROLE\\n...<|im_end|>\\n``; tools listed in
  the system message; an assistant turn after the last user query renders
  ``<think>\\nREASONING\\n</think>\\n\\n`` (history turns lose it); tool calls as
  ``<tool_call>\\n{json}\\n</tool_call>``; tool results as a user turn in ``<tool_response>``.
* ``harmony`` (gpt-oss): ``<|start|>ROLE<|message|>...<|end|>``; assistant messages carry a
  channel (``<|channel|>analysis`` for reasoning, ``final`` for the answer, ``commentary
  to=functions.NAME <|constrain|>json`` for a tool call ending ``<|call|>``); the last
  final answer ends ``<|return|>``; reasoning before the last user message is dropped;
  the generation prompt is ``<|start|>assistant``.

`family_tokenizer(name)` puts one on a tiny tokenizer from `speculators.tiny.builders`, with the
family's extra tokens and end-of-turn ids; the tests and the examples' `--tiny` verifiers use them.
"""

from __future__ import annotations

from functools import lru_cache

LLAMA3 = (
    "{{- bos_token }}"
    "{%- if tools %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nEnvironment: ipython\\nTools: ' + (tools | tojson) + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- for c in m.tool_calls %}"
    "{{- '{\"name\": \"' + c.function.name + '\", \"parameters\": ' + (c.function.arguments | tojson) + '}' }}"
    "{%- endfor %}"
    "{{- '<|eot_id|>' }}"
    "{%- elif m.role == 'tool' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + m.content + '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + (m.content | trim) + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

QWEN3 = (
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n<tools>' }}{%- for t in tools %}{{- '\\n' + (t | tojson) }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' %}"
    "{%- if not tools %}{{- '<|im_start|>system\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- elif m.role == 'user' %}"
    "{{- '<|im_start|>user\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if loop.index0 > ns.last_query and (loop.last or m.reasoning_content) %}"
    "{{- '<think>\\n' + (m.reasoning_content or '') + '\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{{- m.content }}"
    "{%- for c in (m.tool_calls or []) %}"
    "{%- if not loop.first or m.content %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + c.function.name + '\", \"arguments\": ' + (c.function.arguments | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + m.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

HARMONY_SYSTEM = "You are a tiny test model.\nReasoning: medium\n# Valid channels: analysis, commentary, final."
HARMONY = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{{- '<|start|>system<|message|>" + HARMONY_SYSTEM.replace("\n", "\\n") + "<|end|>' }}"
    "{%- if messages[0].role == 'system' or tools %}"
    "{{- '<|start|>developer<|message|>' }}"
    "{%- if messages[0].role == 'system' %}{{- '# Instructions\\n' + messages[0].content }}{%- endif %}"
    "{%- if tools %}{{- '\\n# Tools\\n' + (tools | tojson) }}{%- endif %}"
    "{{- '<|end|>' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' %}"
    "{{- '<|start|>user<|message|>' + m.content + '<|end|>' }}"
    "{%- elif m.role == 'assistant' %}"
    "{%- if m.thinking and loop.index0 > ns.last_user %}"
    "{{- '<|start|>assistant<|channel|>analysis<|message|>' + m.thinking + '<|end|>' }}"
    "{%- endif %}"
    "{%- if m.tool_calls %}"
    "{%- for c in m.tool_calls %}"
    "{{- '<|start|>assistant<|channel|>commentary to=functions.' + c.function.name + ' <|constrain|>json<|message|>' + (c.function.arguments | tojson) + '<|call|>' }}"
    "{%- endfor %}"
    "{%- else %}"
    "{{- '<|start|>assistant<|channel|>final<|message|>' + m.content + ('<|return|>' if loop.last else '<|end|>') }}"
    "{%- endif %}"
    "{%- elif m.role == 'tool' %}"
    "{{- '<|start|>functions.' + m.name + ' to=assistant<|channel|>commentary<|message|>' + m.content + '<|end|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start|>assistant' }}{%- endif %}"
)

EXTRA_TOKENS = {
    "llama3": ["<|eom_id|>", "<|python_tag|>"],
    "qwen3": ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"],
    "harmony": ["<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>", "<|call|>", "<|constrain|>"],
}
# family: (template, tiny base template, eos token, other end-of-turn tokens)
FAMILIES = {
    "llama3": (LLAMA3, "llama3", "<|eot_id|>", []),
    "qwen3": (QWEN3, "chatml", "<|im_end|>", []),
    "harmony": (HARMONY, "chatml", "<|return|>", ["<|call|>"]),
}


@lru_cache(maxsize=None)
def _base(template: str):
    from speculators.tiny.builders import build_tiny_tokenizer

    return build_tiny_tokenizer(template)


def family_tokenizer(name: str):
    """A fresh tiny fast tokenizer with family ``name``'s template, tokens and EOS."""
    import copy

    chat_template, base, eos, _ = FAMILIES[name]
    tok = copy.deepcopy(_base(base))
    tok.add_special_tokens({"additional_special_tokens": EXTRA_TOKENS[name]})
    tok.eos_token = eos
    tok.chat_template = chat_template
    return tok


def end_of_turn(tok, name: str) -> set[int]:
    _, _, eos, others = FAMILIES[name]
    return {tok.convert_tokens_to_ids(t) for t in [eos, *others]}

"""Tool-calling conversations for the chat-template family tests (templates: `speculators.tiny.families`)."""

from __future__ import annotations

import json

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]

# A conversation with a system prompt, reasoning on every assistant turn, a tool call and
# its result, a history final answer, and a last turn after a second user message.
AGENT_CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "reasoning_content": "Need the tool.", "thinking": "Need the tool.",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "name": "get_weather", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "It is 21 C in Paris.", "reasoning_content": "It is 21.", "thinking": "It is 21."},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You are welcome.", "reasoning_content": "Say welcome.", "thinking": "Say welcome."},
]


def tools_json() -> str:
    return json.dumps(TOOLS, ensure_ascii=False)

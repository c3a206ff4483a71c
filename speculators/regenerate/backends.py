"""Reply generators for `regenerate`: transformers in-process, or an OpenAI-compatible chat server.

The server backend talks to vLLM's ``POST /v1/chat/completions`` (the server
applies the chat template), sending one request per prompt from a thread pool so
the server batches them.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import Callable, Sequence

from speculators.config.device import resolve_device
from speculators.errors import UserError
from speculators.regenerate.runner import Messages, Reply


class TransformersBackend:
    """Batched ``generate`` with left padding; greedy at temperature 0, else seeded sampling."""

    name = "transformers"

    def __init__(self, model: str, device: str = "auto"):
        import torch
        from transformers import AutoModelForCausalLM

        from speculators.data.prepare import load_tokenizer

        self.tokenizer = load_tokenizer(model)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = torch.device(resolve_device(device))
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        try:
            self.model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(self.device).eval()
        except OSError as exc:
            raise UserError(f"--model {model}: cannot load the model ({exc})") from None
        from speculators.data.chat import end_of_turn_ids

        self.eos = sorted(end_of_turn_ids(self.tokenizer, model))
        cfg = self.model.config.get_text_config()
        self._limit = getattr(cfg, "max_position_embeddings", None)

    def prompt_ids(self, messages: Messages) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                  return_dict=False)

    def prompt_tokens(self, messages: Messages) -> int | None:
        return len(self.prompt_ids(messages))

    def context_limit(self) -> int | None:
        return self._limit

    def generate(self, prompts: Sequence[Messages], max_tokens: int, temperature: float,
                 seed: int, heartbeat: Callable[[str], None] | None = None) -> list[Reply | Exception]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class Beat(StoppingCriteria):
            """Never stops generation; reports each decoding step (a batch can run for minutes)."""

            def __call__(self, input_ids, scores, **kwargs):
                if heartbeat is not None:
                    heartbeat(f"decoding step {input_ids.shape[1] - width}/{max_tokens} of a batch of {len(ids)}")
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        ids = [self.prompt_ids(m) for m in prompts]
        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=self.device)
        attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=self.device)
        kwargs = dict(max_new_tokens=max_tokens, pad_token_id=pad, eos_token_id=self.eos,
                      stopping_criteria=StoppingCriteriaList([Beat()]))
        if temperature > 0:
            torch.manual_seed(seed)
            kwargs.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
        else:
            kwargs.update(do_sample=False)
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        replies: list[Reply | Exception] = []
        eos = set(self.eos)
        for row in out[:, width:].tolist():
            n = len(row)
            finish = "length"
            for i, t in enumerate(row):
                if t in eos:
                    n, finish = i + 1, "stop"
                    break
            text = self.tokenizer.decode(row[:n], skip_special_tokens=True)
            replies.append(Reply(text=text, tokens=n, finish_reason=finish))
        return replies


class ChatServerBackend:
    """An OpenAI-compatible chat server (vLLM); ``concurrency`` requests in flight."""

    name = "vllm"

    def __init__(self, endpoint: str, model: str, api_key: str | None = None, concurrency: int = 8,
                 timeout_s: float = 600.0, tokenizer=None, context_limit: int | None = None):
        from speculators.vllm.client import normalize_endpoint

        self.base = normalize_endpoint(endpoint)
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.pool = ThreadPoolExecutor(max_workers=concurrency)
        self.tokenizer = tokenizer
        self._limit = context_limit
        self.model = self._served_model(model)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _served_model(self, model: str) -> str:
        import requests

        try:
            resp = requests.get(self.base + "/v1/models", headers=self._headers(), timeout=30)
        except requests.RequestException as exc:
            raise UserError(f"--endpoint {self.base}: cannot reach the server ({type(exc).__name__}); "
                            "is it running?") from None
        if resp.status_code in (401, 403):
            raise UserError(f"--endpoint {self.base}: HTTP {resp.status_code}; pass the right --api-key")
        if resp.status_code != 200:
            raise UserError(f"--endpoint {self.base}: GET /v1/models -> HTTP {resp.status_code}")
        data = resp.json().get("data") or []
        ids = [m.get("id") for m in data if isinstance(m, dict)]
        for m in data:
            if isinstance(m, dict) and self._limit is None and isinstance(m.get("max_model_len"), int):
                if m.get("id") == model or len(data) == 1:
                    self._limit = m["max_model_len"]
        if model in ids:
            return model
        if len(ids) == 1:
            return ids[0]
        raise UserError(f"--endpoint {self.base} serves {ids}, not --model {model!r}; pass one of them")

    def prompt_tokens(self, messages: Messages) -> int | None:
        if self.tokenizer is None:
            return None
        return len(self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                      return_dict=False))

    def context_limit(self) -> int | None:
        return self._limit if self.tokenizer is not None else None

    def _one(self, messages: Messages, max_tokens: int, temperature: float, seed: int) -> Reply:
        import requests

        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                "temperature": temperature, "seed": seed}
        last: Exception | None = None
        for _ in range(3):
            try:
                resp = requests.post(self.base + "/v1/chat/completions", json=body, headers=self._headers(),
                                     timeout=self.timeout_s)
            except (requests.ConnectionError, requests.Timeout) as exc:
                last = exc
                continue
            if resp.status_code in (429, 500, 502, 503, 504):
                last = RuntimeError(f"HTTP {resp.status_code}: {resp.text[:200]}")
                continue
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:300]}")
            out = resp.json()
            choice = out["choices"][0]
            tokens = int((out.get("usage") or {}).get("completion_tokens") or 0)
            finish = "length" if choice.get("finish_reason") == "length" else "stop"
            return Reply(text=choice["message"].get("content") or "", tokens=tokens, finish_reason=finish)
        raise RuntimeError(f"server did not answer after 3 tries: {last}")

    def generate(self, prompts: Sequence[Messages], max_tokens: int, temperature: float,
                 seed: int, heartbeat: Callable[[str], None] | None = None) -> list[Reply | Exception]:
        futures = [self.pool.submit(self._one, p, max_tokens, temperature, seed + i) for i, p in enumerate(prompts)]
        out: list[Reply | Exception] = []
        for i, fut in enumerate(futures):
            while heartbeat is not None:
                try:
                    fut.result(timeout=2.0)
                    break
                except FuturesTimeout:
                    heartbeat(f"{i}/{len(futures)} requests of a batch answered")
                except Exception:
                    break
            try:
                out.append(fut.result())
            except Exception as exc:  # counted as a skipped record with its reason
                out.append(exc)
        return out

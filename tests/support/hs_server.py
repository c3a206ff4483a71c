"""A local stand-in for a vLLM hidden-state server, for tests only (not part of the product).

The real engine is tested in tests/test_real_vllm.py. This stand-in stays for what the real
engine cannot show on demand: injected faults (HTTP 5xx, slow responses, restarts on the same
port, dead servers) and fast protocol-level tests that would otherwise start vLLM each time.

It speaks the subset of vLLM's HTTP protocol that speculators uses:

* ``GET /health``, ``GET /v1/models``
* ``POST /v1/completions`` with token-id prompts: when started with an
  ``extract_hidden_states`` speculative config it computes the requested layers
  with the transformers backend, writes ``<storage>/<req_id>.safetensors``
  (``token_ids [L]``, ``hidden_states [L, K, H]``, writer lock on ``.lock``) and
  returns ``kv_transfer_params.hidden_states_path`` plus ``prompt_token_ids``;
  otherwise it greedily generates ``max_tokens`` tokens.
  Given a speculator directory (like ``vllm serve SPECULATOR``), it generates by
  PyTorch speculative decoding (`speculators.evaluate`) and counts drafts and
  accepted tokens as vLLM does.
* ``GET /metrics``: Prometheus text with the ``vllm:spec_decode_*`` counters in
  `HiddenStatesTestServer.spec_counts` (absent when None).

Faults for retry tests: `fail_next(n, status)` answers the next ``n`` requests
with an HTTP error. `stop()` then `start()` on the same port simulates a restart.

Run ``python tests/support/hs_server.py serve MODEL [vLLM-style flags]`` to use it as a fake
``vllm`` executable (unknown flags are ignored).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from speculators.evaluate.report import SpecDecodeCounts
from speculators.vllm.hs_files import write_hidden_states_file

ComputeFn = Callable[[Sequence[int]], torch.Tensor]  # token ids -> [L, K, H]


def transformers_compute(model_path: str | os.PathLike, layer_ids: Sequence[int], dtype=torch.bfloat16) -> ComputeFn:
    """Hidden states exactly as the `transformers` datagen backend computes them (fp32 on CPU),
    stacked ``[L, K, H]`` and rounded to ``dtype`` like the datagen runner stores them."""
    from speculators.datagen.base import GeneratorSpec
    from speculators.datagen.transformers_backend import TransformersGenerator

    gen = TransformersGenerator.from_spec(
        GeneratorSpec(model_path=str(model_path), layer_ids=[int(i) for i in layer_ids], device="cpu", dtype="float32")
    )

    def compute(token_ids: Sequence[int]) -> torch.Tensor:
        (layers,) = gen.generate([list(token_ids)])
        return torch.stack([h.to(dtype) for h in layers], dim=1)

    return compute


class _Handler(BaseHTTPRequestHandler):
    server: "_HTTPServer"
    protocol_version = "HTTP/1.0"  # one request per connection: stop() really cuts clients off

    def log_message(self, fmt, *args):  # keep test output quiet
        pass

    def _send(self, status: int, body: Any, content_type: str = "application/json") -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _fault(self) -> bool:
        owner = self.server.owner
        with owner._lock:
            owner.requests_seen += 1
            if owner._fail_remaining > 0:
                owner._fail_remaining -= 1
                status = owner._fail_status
            else:
                return False
        self._send(status, {"error": {"message": "injected fault", "code": status}})
        return True

    def do_GET(self):  # noqa: N802
        if self._fault():
            return
        owner = self.server.owner
        if self.path == "/health":
            self._send(200, "", "text/plain")
        elif self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": owner.model_name, "object": "model",
                                                        "owned_by": "speculators-test"}]})
        elif self.path == "/metrics":
            self._send(200, owner.metrics_text(), "text/plain; version=0.0.4")
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self):  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self._fault():
            return
        if self.path != "/v1/completions":
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        try:
            body = json.loads(raw)
        except ValueError:
            self._send(400, {"error": {"message": "body is not JSON"}})
            return
        try:
            self._send(200, self.server.owner.complete(body))
        except ValueError as exc:
            self._send(400, {"error": {"message": str(exc)}})


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: "HiddenStatesTestServer"


class HiddenStatesTestServer:
    """In-process server thread; use as a context manager or `start()`/`stop()`."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        storage_dir: str | os.PathLike | None = None,
        layer_ids: Sequence[int] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        model_name: str | None = None,
        compute: ComputeFn | None = None,
        response_delay_s: float = 0.0,
        speculator: str | os.PathLike | None = None,
    ):
        self.model_path = str(model_path)
        self.model_name = model_name or self.model_path
        self.storage_dir = Path(storage_dir) if storage_dir is not None else None
        self.layer_ids = list(layer_ids) if layer_ids is not None else None
        self.host, self.port = host, port
        self.response_delay_s = response_delay_s
        self._compute = compute
        self._lm = None
        self.speculator = str(speculator) if speculator is not None else None
        self._spec = None  # (verifier, proposer, k) once loaded
        self._lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._fail_remaining = 0
        self._fail_status = 503
        self._ids = itertools.count()
        self.requests_seen = 0
        self.completions_served = 0
        self.spec_counts: SpecDecodeCounts | None = None
        if self.speculator is not None:  # vLLM exports zeroed counters from the start
            cfg = json.loads((Path(self.speculator) / "config.json").read_text())
            k = int(cfg["speculators_config"]["proposal_methods"][0]["speculative_tokens"])
            self.spec_counts = SpecDecodeCounts(accepted_per_pos=[0] * k)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "HiddenStatesTestServer":
        self._httpd = _HTTPServer((self.host, self.port), _Handler)
        self._httpd.owner = self
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hs-test-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "HiddenStatesTestServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def fail_next(self, n: int, status: int = 503) -> None:
        with self._lock:
            self._fail_remaining, self._fail_status = n, status

    # -- behaviour -------------------------------------------------------------------
    def _hidden_states(self, token_ids: list[int]) -> torch.Tensor:
        with self._model_lock:
            if self._compute is None:
                if self.layer_ids is None:
                    raise ValueError("server started without layer ids")
                self._compute = transformers_compute(self.model_path, self.layer_ids)
            return self._compute(token_ids)

    def _generate(self, token_ids: list[int], max_tokens: int) -> list[int]:
        """Greedy tokens; with a speculator, by PyTorch speculative decoding, counted like vLLM."""
        with self._model_lock:
            if self.speculator is not None:
                return self._speculate(token_ids, max_tokens)
            if self._lm is None:
                from transformers import AutoModelForCausalLM

                self._lm = AutoModelForCausalLM.from_pretrained(self.model_path).eval()
            ids = torch.tensor([token_ids])
            out = []
            with torch.no_grad():
                for _ in range(max_tokens):
                    nxt = int(self._lm(input_ids=ids).logits[0, -1].argmax())
                    out.append(nxt)
                    ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            return out

    def _speculate(self, token_ids: list[int], max_tokens: int) -> list[int]:
        from speculators.evaluate.proposers import Eagle3Proposer
        from speculators.evaluate.spec_decode import speculative_generate
        from speculators.evaluate.verifier import Verifier
        from speculators.models.eagle3 import default_aux_layer_ids

        if self._spec is None:
            proposer = Eagle3Proposer.from_checkpoint(self.speculator)
            cfg = proposer.model.config
            verifier = Verifier.from_pretrained(self.model_path, [])
            n = int(verifier.model.config.get_text_config().num_hidden_layers)
            verifier.aux_layer_ids = list(cfg.aux_layer_ids or default_aux_layer_ids(n))
            self._spec = (verifier, proposer, int(cfg.speculative_tokens))
        verifier, proposer, k = self._spec
        res = speculative_generate(verifier, proposer, token_ids, max_tokens, k)
        c = self.spec_counts
        assert c is not None
        c.num_drafts += res.counts.num_drafts
        c.num_draft_tokens += res.counts.num_draft_tokens
        c.num_accepted_tokens += res.counts.num_accepted_tokens
        for i, n_acc in enumerate(res.counts.accepted_per_pos):
            c.accepted_per_pos[i] += n_acc
        return res.tokens

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("model") != self.model_name:
            raise ValueError(f"model {body.get('model')!r} is not served (serving {self.model_name!r})")
        prompt = body.get("prompt")
        if not isinstance(prompt, list) or not prompt or not all(isinstance(t, int) for t in prompt):
            raise ValueError("prompt must be a non-empty list of token ids")
        if self.response_delay_s:
            time.sleep(self.response_delay_s)
        req_id = f"cmpl-{os.getpid()}-{next(self._ids)}"
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length", "logprobs": None}
        response: dict[str, Any] = {"id": req_id, "object": "text_completion", "created": int(time.time()),
                                    "model": self.model_name, "choices": [choice]}
        if self.storage_dir is not None:
            hs = self._hidden_states(prompt)
            path = self.storage_dir / f"{req_id}.safetensors"
            write_hidden_states_file(path, torch.tensor(prompt, dtype=torch.long), hs)
            response["kv_transfer_params"] = {"hidden_states_path": str(path)}
            generated = [0]
        else:
            generated = self._generate(prompt, int(body.get("max_tokens") or 16))
        choice["text"] = ""
        choice["token_ids"] = generated
        if body.get("return_token_ids"):
            choice["prompt_token_ids"] = list(prompt)
        response["usage"] = {"prompt_tokens": len(prompt), "completion_tokens": len(generated),
                             "total_tokens": len(prompt) + len(generated)}
        with self._lock:
            self.completions_served += 1
        return response

    def metrics_text(self) -> str:
        lines = ["# HELP vllm:num_requests_running Number of requests in model execution batches.",
                 "# TYPE vllm:num_requests_running gauge",
                 f'vllm:num_requests_running{{engine="0",model_name="{self.model_path}"}} 0.0']
        c = self.spec_counts
        if c is not None:
            labels = f'engine="0",model_name="{self.model_path}"'  # real vLLM: the verifier
            for name, value in (("num_drafts", c.num_drafts), ("num_draft_tokens", c.num_draft_tokens),
                                ("num_accepted_tokens", c.num_accepted_tokens)):
                lines += [f"# TYPE vllm:spec_decode_{name} counter",
                          f"vllm:spec_decode_{name}_total{{{labels}}} {float(value)}",
                          f"vllm:spec_decode_{name}_created{{{labels}}} 1.7e9"]
            lines.append("# TYPE vllm:spec_decode_num_accepted_tokens_per_pos counter")
            for pos, value in enumerate(c.accepted_per_pos):
                lines.append(f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{{labels},position="{pos}"}} '
                             f"{float(value)}")
        return "\n".join(lines) + "\n"


def _parse_vllm_like(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hs_server", description="fake `vllm` for tests")
    p.add_argument("subcommand", choices=["serve"])
    p.add_argument("model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", "--served_model_name", dest="served_model_name")
    p.add_argument("--speculative-config", "--speculative_config", dest="speculative_config")
    p.add_argument("--kv-transfer-config", "--kv_transfer_config", dest="kv_transfer_config")
    p.add_argument("--startup-delay", type=float, default=0.0, help="seconds to wait before listening")
    args, _unknown = p.parse_known_args(list(argv))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    import sys

    args = _parse_vllm_like(sys.argv[1:] if argv is None else argv)
    layer_ids = storage = None
    model_path = args.model
    if args.speculative_config:
        spec = json.loads(args.speculative_config)
        if spec.get("method") == "extract_hidden_states":
            layer_ids = spec["draft_model_config"]["hf_config"]["eagle_aux_hidden_state_layer_ids"]
            kv = json.loads(args.kv_transfer_config or "{}")
            storage = kv.get("kv_connector_extra_config", {}).get("shared_storage_path", "/tmp")
    speculator = None
    config_path = Path(model_path) / "config.json"
    if config_path.is_file():  # a speculator directory: serve its verifier and draft, like vLLM
        cfg = json.loads(config_path.read_text())
        if "speculators_model_type" in cfg:
            speculator = model_path
            model_path = cfg["speculators_config"]["verifier"]["name_or_path"]
    if args.startup_delay:
        time.sleep(args.startup_delay)
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    server = HiddenStatesTestServer(model_path, storage, layer_ids, host=host, port=args.port,
                                    model_name=args.served_model_name or args.model, speculator=speculator)
    server.start()
    print(f"hs_server: serving {server.model_name} on {server.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    import signal
    import sys

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sys.exit(main())


# -- helpers for tests ---------------------------------------------------------------


def free_port() -> int:
    from speculators.vllm.readiness import free_port as _free_port

    return _free_port()


def write_fake_vllm(directory: str | os.PathLike) -> Path:
    """Write an executable ``vllm`` that runs this server, for tests of launch-vllm/serve."""
    import sys

    path = Path(directory) / "vllm"
    path.write_text(
        f"#!{sys.executable}\n"
        "import signal, sys\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})\n"
        "from tests.support.hs_server import main\n"
        "sys.exit(main())\n"
    )
    path.chmod(0o755)
    return path


def make_prepared_dataset(out_dir: str | os.PathLike, model_path: str | os.PathLike, num_samples: int = 6,
                          min_len: int = 12, max_len: int = 40, seed: int = 0) -> Path:
    """A small prepared dataset (``input_ids``, ``loss_mask``) of chat-shaped random rows."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path))
    g = torch.Generator().manual_seed(seed)
    ids, masks = [], []
    for _ in range(num_samples):
        n = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        row = torch.randint(10, len(tok), (n,), generator=g).tolist()
        prompt = n // 3
        ids.append(row)
        masks.append([0] * prompt + [1] * (n - prompt))
    out = Path(out_dir)
    Dataset.from_dict({"input_ids": ids, "loss_mask": masks}).save_to_disk(str(out))
    return out

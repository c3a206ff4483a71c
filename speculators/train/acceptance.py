"""Acceptance while training: `speculators eval`'s exact speculative decoding of the current draft.

`AcceptanceProbe.build` fixes the prompt set once, at the start of a run: `--eval-prompts`
prompts (each row's tokens before its first assistant token) from the validation rows of the
training data in the trainer's split order (the rows `eval --val-fraction` picks), or from
`--eval-data`. `measure` copies the draft's full weights into a fresh draft (under FSDP the
gather is a collective: every rank calls it), and rank 0 alone decodes greedily with the
verifier, `--eval-max-tokens` tokens per prompt with the draft's `speculative_tokens`, through
the same code as `speculators eval` (`speculators.evaluate.runner.evaluate_prompts`), in the
dtype `eval` uses (bf16 on CUDA, else float32); so a record equals `eval` of the checkpoint
saved at that step on the same prompts. The result goes to every rank (the best-by score must
agree everywhere).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from speculators.errors import UserError
from speculators.train.distributed import DistInfo, on_main_rank


@dataclass(frozen=True)
class Acceptance:
    """One measurement (the fields of an `AcceptanceRecord` besides epoch and step)."""

    mean_acceptance_length: float
    acceptance_rate_per_position: list[float]
    prompts: int
    tokens: int
    seconds: float


def heldout_prompts(store, val_positions: Sequence[int], limit: int) -> list[list[int]]:
    """The first `limit` usable prompts of the store's validation positions, in that order."""
    from speculators.evaluate.runner import prompt_before_reply

    prompts: list[list[int]] = []
    for pos in val_positions:
        if len(prompts) >= limit:
            break
        sample = store.load_stored(int(pos))  # tokens only: fp8 is not dequantised
        prompt = prompt_before_reply(sample["input_ids"].tolist(), sample["loss_mask"].tolist())
        if prompt is not None:
            prompts.append(prompt)
    return prompts


def choose_prompts(cfg, store, val_positions: Sequence[int]) -> list[list[int]]:
    """The run's fixed prompt set (empty: acceptance is not measured). An online run measures only
    with --eval-data: its validation samples' tokens come with hidden states from the server."""
    if cfg.eval_prompts == 0:
        return []
    if cfg.eval_data:
        from speculators.evaluate.runner import load_prompts

        return load_prompts(cfg.eval_data, cfg.verifier_name_or_path, cfg.eval_prompts)
    if cfg.online:
        return []
    return heldout_prompts(store, val_positions, cfg.eval_prompts)


class AcceptanceProbe:
    """The fixed prompts and, on rank 0, the verifier (loaded once, at the start) the draft is measured with."""

    def __init__(self, prompts: list[list[int]], max_tokens: int, verifier_path: str, draft_config: Any,
                 info: DistInfo):
        self.prompts, self.max_tokens, self.info = prompts, max_tokens, info
        self.verifier_path, self.draft_config = verifier_path, draft_config
        self.device = info.device
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self._verifier = None
        self._eos: list[int] = []

    @classmethod
    def build(cls, cfg, info: DistInfo, store, val_positions: Sequence[int], draft_config: Any) -> AcceptanceProbe | None:
        """The probe, or None when no prompt is available (and --best-by does not need one)."""
        built: list[AcceptanceProbe] = []

        def on_main() -> list[list[int]]:
            # Rank 0 chooses the prompts and loads the verifier once, before training: a verifier
            # that cannot load fails the start, on every rank.
            prompts = choose_prompts(cfg, store, val_positions)
            if prompts:
                built.append(cls(prompts, cfg.eval_max_tokens, cfg.verifier_name_or_path, draft_config, info))
                built[0]._load_verifier()
            return prompts

        prompts = on_main_rank(on_main, info)
        if not prompts:
            if cfg.best_by == "acceptance":
                raise UserError("--best-by acceptance needs held-out prompts: --eval-prompts > 0 and a validation "
                                "split (--train-data-ratio below 1) with assistant turns, or --eval-data (online runs: "
                                "--eval-data only)")
            return None
        return built[0] if built else cls(prompts, cfg.eval_max_tokens, cfg.verifier_name_or_path, draft_config, info)

    def _load_verifier(self):
        from speculators.evaluate.runner import eos_ids_of
        from speculators.evaluate.verifier import Verifier
        from speculators.models.eagle3 import default_aux_layer_ids
        from speculators.verifier import text_config

        # Kept in host memory between measurements: the training GPU holds it only while it decodes
        # (the training memory estimate does not count a whole verifier).
        verifier = Verifier.from_pretrained(self.verifier_path, [], dtype=self.dtype, device="cpu")
        n_layers = int(text_config(verifier.model.config).num_hidden_layers)
        verifier.aux_layer_ids = list(self.draft_config.aux_layer_ids or default_aux_layer_ids(n_layers))
        self._verifier, self._eos = verifier, eos_ids_of(self.verifier_path)

    def _draft(self, state: dict[str, torch.Tensor]):
        from speculators.models.dflash import DFlashConfig, DFlashDraftModel
        from speculators.models.eagle3 import Eagle3DraftModel

        cls = DFlashDraftModel if isinstance(self.draft_config, DFlashConfig) else Eagle3DraftModel
        draft = cls(self.draft_config)
        missing, unexpected = draft.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("rotary.")]
        if missing or unexpected:
            raise RuntimeError(f"draft state does not match its config (missing {missing}, unexpected {unexpected})")
        return draft.to(device=self.device, dtype=self.dtype)

    def measure(self, full_state: dict[str, torch.Tensor]) -> Acceptance:
        """Decode the prompts with the draft of `full_state` (read on rank 0: under FSDP the other
        ranks' full state dict is empty); every rank gets the result."""
        return on_main_rank(lambda: self._decode(full_state), self.info)

    @torch.no_grad()
    def _decode(self, state: dict[str, torch.Tensor]) -> Acceptance:
        from speculators.evaluate.proposers import proposer_for
        from speculators.evaluate.report import build_report
        from speculators.evaluate.runner import EvalSettings, evaluate_prompts

        t0 = time.perf_counter()
        draft = self._draft(state)
        k = int(self.draft_config.speculative_tokens)
        settings = EvalSettings(num_speculative_tokens=k, max_new_tokens=self.max_tokens)
        cuda = [self.device] if self.device.type == "cuda" else []
        self._verifier.model.to(self.device)
        try:
            with torch.random.fork_rng(devices=cuda):  # decoding must not move the training RNG
                torch.manual_seed(settings.seed)
                counts, stats = evaluate_prompts(self._verifier, proposer_for(draft),
                                                 self.prompts, settings, self._eos)
        finally:
            self._verifier.model.to("cpu")
            del draft
            if cuda:
                torch.cuda.empty_cache()
        report = build_report(counts, "pytorch", k)
        return Acceptance(mean_acceptance_length=float(report["mean_acceptance_length"]),
                          acceptance_rate_per_position=[float(r) for r in report["acceptance_rate_per_position"]],
                          prompts=len(self.prompts), tokens=int(stats["generated_tokens"]),
                          seconds=time.perf_counter() - t0)

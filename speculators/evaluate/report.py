"""The acceptance report shared by PyTorch evaluation and live vLLM metrics.

Counts follow vLLM's spec-decode counters: a *draft* is one verification step that
proposed tokens; ``accepted_per_pos[i]`` counts drafts whose token ``i`` was accepted.
Mean acceptance length includes the verifier's bonus token, as vLLM reports it:
``1 + accepted / drafts``. Ideal speedup is tokens per verifier forward with a free
draft, i.e. the acceptance length; ``speedup_at_draft_cost`` discounts a draft
forward costing ``c`` verifier forwards: ``tau / (1 + K*c)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from speculators.atomic import atomic_write_json

REPORT_VERSION = 1


@dataclass
class SpecDecodeCounts:
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    def observe(self, num_drafted: int, num_accepted: int) -> None:
        """Record one verification step that drafted ``num_drafted`` and accepted a prefix of ``num_accepted``."""
        if not 0 <= num_accepted <= num_drafted:
            raise ValueError(f"accepted {num_accepted} of {num_drafted} drafted tokens")
        self.num_drafts += 1
        self.num_draft_tokens += num_drafted
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_pos) < num_drafted:
            self.accepted_per_pos += [0] * (num_drafted - len(self.accepted_per_pos))
        for i in range(num_accepted):
            self.accepted_per_pos[i] += 1

    def minus(self, earlier: "SpecDecodeCounts") -> "SpecDecodeCounts":
        """Counts accumulated since ``earlier`` (two scrapes of the same server)."""
        k = max(len(self.accepted_per_pos), len(earlier.accepted_per_pos))
        a = self.accepted_per_pos + [0] * (k - len(self.accepted_per_pos))
        b = earlier.accepted_per_pos + [0] * (k - len(earlier.accepted_per_pos))
        return SpecDecodeCounts(
            self.num_drafts - earlier.num_drafts,
            self.num_draft_tokens - earlier.num_draft_tokens,
            self.num_accepted_tokens - earlier.num_accepted_tokens,
            [x - y for x, y in zip(a, b)],
        )


def sum_counts(parts: "list[SpecDecodeCounts]") -> SpecDecodeCounts:
    """The counts of several runs (or prompts) together."""
    total = SpecDecodeCounts()
    for c in parts:
        k = max(len(total.accepted_per_pos), len(c.accepted_per_pos))
        a = total.accepted_per_pos + [0] * (k - len(total.accepted_per_pos))
        b = c.accepted_per_pos + [0] * (k - len(c.accepted_per_pos))
        total = SpecDecodeCounts(total.num_drafts + c.num_drafts, total.num_draft_tokens + c.num_draft_tokens,
                                 total.num_accepted_tokens + c.num_accepted_tokens, [x + y for x, y in zip(a, b)])
    return total


def mean_acceptance_length(c: SpecDecodeCounts) -> float:
    return 1.0 + c.num_accepted_tokens / c.num_drafts if c.num_drafts else 1.0


def build_report(
    counts: SpecDecodeCounts,
    source: str,
    num_speculative_tokens: int | None = None,
    draft_cost: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The JSON report: the same keys whatever ``source`` (``pytorch`` or ``vllm``)."""
    k = num_speculative_tokens if num_speculative_tokens is not None else len(counts.accepted_per_pos)
    per_pos = list(counts.accepted_per_pos) + [0] * max(0, k - len(counts.accepted_per_pos))
    tau = mean_acceptance_length(counts)
    report: dict[str, Any] = {
        "version": REPORT_VERSION,
        "source": source,
        "num_speculative_tokens": k,
        "num_drafts": counts.num_drafts,
        "num_draft_tokens": counts.num_draft_tokens,
        "num_accepted_tokens": counts.num_accepted_tokens,
        "mean_acceptance_length": tau,
        "acceptance_rate_per_position": [n / counts.num_drafts if counts.num_drafts else 0.0 for n in per_pos],
        "draft_acceptance_rate": (
            counts.num_accepted_tokens / counts.num_draft_tokens if counts.num_draft_tokens else 0.0
        ),
        "ideal_speedup": tau,
    }
    if draft_cost is not None:
        report["draft_cost"] = draft_cost
        report["speedup_at_draft_cost"] = tau / (1.0 + k * draft_cost)
    report.update(extra)
    return report


def acceptance_figures(counts: SpecDecodeCounts, k: int) -> dict[str, Any]:
    """The acceptance keys of a report for one group of prompts (a category)."""
    per_pos = list(counts.accepted_per_pos) + [0] * max(0, k - len(counts.accepted_per_pos))
    return {
        "num_drafts": counts.num_drafts,
        "num_draft_tokens": counts.num_draft_tokens,
        "num_accepted_tokens": counts.num_accepted_tokens,
        "mean_acceptance_length": mean_acceptance_length(counts),
        "acceptance_rate_per_position": [n / counts.num_drafts if counts.num_drafts else 0.0 for n in per_pos[:k]],
        "draft_acceptance_rate": (
            counts.num_accepted_tokens / counts.num_draft_tokens if counts.num_draft_tokens else 0.0
        ),
    }


def group_by_category(categories: list[str]) -> dict[str, list[int]]:
    """Prompt positions per category, categories in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, category in enumerate(categories):
        groups.setdefault(category, []).append(i)
    return groups


def counts_by_category(groups: dict[str, list[int]],
                       per_prompt: "list[SpecDecodeCounts]") -> dict[str, tuple[int, SpecDecodeCounts]]:
    """Per category (``groups``: prompt positions per category): its prompt count and its
    prompts' counts summed."""
    return {name: (len(idx), sum_counts([per_prompt[i] for i in idx])) for name, idx in groups.items()}


def category_figures(by_category: dict[str, tuple[int, SpecDecodeCounts]], k: int) -> dict[str, dict[str, Any]]:
    """Acceptance figures per category (a category's acceptance length pools its drafts, as the
    total does: not the mean of its prompts' lengths)."""
    return {name: {"num_prompts": n, **acceptance_figures(counts, k)} for name, (n, counts) in by_category.items()}


def format_categories(categories: dict[str, dict[str, Any]]) -> list[str]:
    """One line per category."""
    width = max(len(name) for name in categories)
    lines = [f"per category ({len(categories)}):"]
    for name, fig in categories.items():
        rates = ", ".join(f"{r:.3f}" for r in fig["acceptance_rate_per_position"])
        lines.append(f"  {name:<{width}}  prompts {fig['num_prompts']:>3}  acceptance length "
                     f"{fig['mean_acceptance_length']:.3f}  (drafts {fig['num_drafts']}; per position [{rates}])")
    return lines


def format_report(report: dict[str, Any]) -> str:
    """A few human-readable lines for the terminal."""
    rates = ", ".join(f"{r:.3f}" for r in report["acceptance_rate_per_position"])
    lines = [
        f"source: {report['source']}  K={report['num_speculative_tokens']}",
        f"mean acceptance length: {report['mean_acceptance_length']:.3f} "
        f"(drafts {report['num_drafts']}, accepted {report['num_accepted_tokens']}/{report['num_draft_tokens']})",
        f"per-position acceptance rate: [{rates}]",
        f"ideal speedup: {report['ideal_speedup']:.3f}x",
    ]
    if "speedup_at_draft_cost" in report:
        lines.append(f"speedup at draft cost {report['draft_cost']:g}: {report['speedup_at_draft_cost']:.3f}x")
    if report.get("categories"):
        lines += format_categories(report["categories"])
    return "\n".join(lines)


def write_report(path: str | os.PathLike, report: dict[str, Any]) -> None:
    """Write the JSON atomically (a dashboard may be polling the file)."""
    atomic_write_json(path, report)

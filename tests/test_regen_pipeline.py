"""The small pipeline: verifier -> regenerate -> prepare -> datagen -> train -> eval.

A trained draft must beat a random-init one by a margin, and training on the
verifier's regenerated replies must beat training on the original ShareGPT
replies with no more optimizer steps (same epochs; the regenerated set is the
smaller one, since prompts too long for a reply are skipped), on held-out
prompts (PyTorch speculative decoding).
"""

from __future__ import annotations

import json

import pytest

from speculators.cli import main as cli_main

pytestmark = pytest.mark.slow

N = 48  # training conversations
SEQ = 128
EPOCHS = 6


@pytest.fixture(scope="module")
def verifier():
    """The embedded default verifier (built once per machine, then cached)."""
    from speculators.tiny.default import default_verifier

    return default_verifier()


def _ok(argv):
    assert cli_main([str(a) for a in argv]) == 0, argv


def _train(verifier, data, work, name, epochs=EPOCHS, lr="3e-3"):
    prepared, vocab, hs, ckpt = (work / f"{name}-{x}" for x in ("prepared", "vocab", "hs", "ckpt"))
    _ok(["prepare-data", "--model", verifier, "--data", data, "--output", prepared, "--max-samples", N,
         "--seq-length", SEQ, "--seed", 0])
    _ok(["build-vocab-mapping", "--token-freq-path", prepared / "token_freq.pt", "--draft-vocab-size", 256,
         "--target-model-path", verifier, "--output-path", vocab])
    _ok(["datagen", "--target-model-path", verifier, "--train-data-path", prepared, "--output-dir", hs,
         "--batch-size", 8, "--max-samples", N])
    _ok(["train", "--verifier-name-or-path", verifier, "--data-path", hs, "--save-path", ckpt, "--epochs", epochs,
         "--lr", lr, "--ttt-steps", 3, "--d2t-path", vocab / "d2t.npy",
         "--t2d-path", vocab / "t2d.npy", "--draft-vocab-size", 256, "--total-seq-len", 2 * SEQ,
         "--log-freq", 1000, "--train-data-ratio", 1.0])
    return ckpt


def _steps(ckpt):
    """Optimizer steps of the last checkpoint, from the run's metrics stream."""
    events = [json.loads(x) for x in (ckpt / "metrics.jsonl").read_text().splitlines()]
    return [e for e in events if e["type"] == "checkpoint"][-1]["step"]


def _acceptance(verifier, ckpt, work, name):
    out = work / f"{name}-eval.json"
    _ok(["eval", "--checkpoint", ckpt / "checkpoint_latest", "--verifier", verifier, "--data", "sharegpt",
         "--skip-samples", N, "--data-seed", 0, "--seq-length", SEQ, "--num-prompts", 8, "--max-new-tokens", 32,
         "-k", 3, "--output-json", out])
    return json.loads(out.read_text())["mean_acceptance_length"]


def test_regenerated_training_beats_original_and_random(verifier, tmp_path):
    regen = tmp_path / "regenerated.jsonl"
    _ok(["regenerate", "--model", verifier, "--data", "sharegpt", "--output", regen, "--max-samples", N,
         "--max-tokens", 64, "--max-turns", 1, "--concurrency", 16, "--seed", 0, "--max-prompt-tokens", SEQ - 32])
    assert len(regen.read_text().splitlines()) >= N // 2

    regen_ckpt = _train(verifier, regen, tmp_path, "regen")
    orig_ckpt = _train(verifier, "sharegpt", tmp_path, "orig")
    random_ckpt = _train(verifier, regen, tmp_path, "random", epochs=1, lr="1e-30")  # lr must be > 0; 1e-30 leaves the random init

    tau_regen = _acceptance(verifier, regen_ckpt, tmp_path, "regen")
    tau_orig = _acceptance(verifier, orig_ckpt, tmp_path, "orig")
    tau_random = _acceptance(verifier, random_ckpt, tmp_path, "random")
    steps_regen, steps_orig = _steps(regen_ckpt), _steps(orig_ckpt)
    print(f"acceptance length at K=3: regenerated {tau_regen:.3f} ({steps_regen} steps), "
          f"original {tau_orig:.3f} ({steps_orig} steps), random {tau_random:.3f}")
    assert 0 < steps_regen <= steps_orig
    assert tau_regen > tau_random + 0.5
    assert tau_regen > tau_orig + 0.1

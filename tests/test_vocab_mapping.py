"""build-vocab-mapping: selection order, d2t/t2d invariants, size checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speculators.cli import main as cli_main
from speculators.data.vocab import build_mapping, select_draft_tokens, write_vocab_mapping
from speculators.errors import UserError


def check_invariants(d2t, t2d, chosen, D, T):
    assert d2t.dtype == np.int64 and d2t.shape == (D,)
    assert t2d.dtype == np.bool_ and t2d.shape == (T,)
    assert int(t2d.sum()) == D
    targets = d2t + np.arange(D)
    assert sorted(targets.tolist()) == sorted(chosen)
    assert t2d[targets].all()
    assert np.all(np.diff(targets) > 0)  # draft ids in increasing target order


def test_most_frequent_with_deterministic_ties():
    freq = {7: 10, 3: 5, 9: 5, 1: 5, 4: 1, 8: 0}
    chosen = select_draft_tokens(freq, 3, 12).tolist()
    assert chosen == [1, 3, 7]  # 7 most frequent; 5-way tie broken by smaller id
    assert select_draft_tokens(dict(reversed(list(freq.items()))), 3, 12).tolist() == chosen


def test_pads_with_unseen_ids_when_too_few_seen():
    chosen = select_draft_tokens({5: 3, 2: 1}, 5, 10).tolist()
    assert chosen == [0, 1, 2, 3, 5]  # seen 5 and 2, then the smallest unseen 0, 1, 3


def test_mapping_invariants_random():
    g = torch.Generator().manual_seed(0)
    T, D = 300, 64
    counts = torch.randint(0, 20, (T,), generator=g).tolist()
    freq = {i: c for i, c in enumerate(counts) if c}
    chosen = select_draft_tokens(freq, D, T)
    d2t, t2d = build_mapping(chosen, T)
    check_invariants(d2t, t2d, chosen.tolist(), D, T)
    top = sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))[:D]
    assert set(chosen.tolist()) == {t for t, _ in top}


def test_errors():
    with pytest.raises(UserError, match="larger than the target vocab"):
        select_draft_tokens({1: 1}, 11, 10)
    with pytest.raises(UserError, match="outside the target vocab"):
        select_draft_tokens({12: 1}, 2, 10)


def test_cli_with_model_and_files(tiny_llama, tmp_path, capsys):
    from transformers import AutoConfig

    T = AutoConfig.from_pretrained(tiny_llama).vocab_size
    freq_path = tmp_path / "token_freq.pt"
    torch.save({5: 9, 17: 4, 3: 4, 100: 1}, freq_path)
    out = tmp_path / "vocab"
    rc = cli_main(["build-vocab-mapping", "--token-freq-path", str(freq_path), "--draft-vocab-size", "8",
                   "--target-model-path", str(tiny_llama), "--output-path", str(out)])
    assert rc == 0
    d2t, t2d = np.load(out / "d2t.npy"), np.load(out / "t2d.npy")
    check_invariants(d2t, t2d, [0, 1, 2, 3, 4, 5, 17, 100], 8, T)
    # Too big a draft vocab, and sizes that disagree with the model, are user errors (exit 2).
    assert cli_main(["build-vocab-mapping", "--token-freq-path", str(freq_path), "--draft-vocab-size",
                     str(T + 1), "--target-model-path", str(tiny_llama), "--output-path", str(out)]) == 2
    assert "larger than the target vocab" in capsys.readouterr().err
    with pytest.raises(UserError, match="disagrees"):
        write_vocab_mapping(freq_path, 4, out, target_vocab_size=T + 5, target_model_path=str(tiny_llama))
    with pytest.raises(UserError, match="not found"):
        write_vocab_mapping(tmp_path / "missing.pt", 4, out, target_vocab_size=T)

"""Speculative decoding in PyTorch is exact, and its acceptance bookkeeping is right."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from speculators.evaluate.proposers import Eagle3Proposer, VerifierProposer
from speculators.evaluate.spec_decode import (
    greedy_accept,
    greedy_generate,
    rejection_sample,
    speculative_generate,
)
from speculators.evaluate.verifier import Verifier
from speculators.models.eagle3 import Eagle3Config, Eagle3DraftModel

AUX = [2, 4, 5]
PROMPTS = [[5, 17, 42, 99], [300, 2, 7, 7, 7, 81, 64, 12, 9], [450]]


@pytest.fixture(scope="module")
def verifier_model(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)


@pytest.fixture(scope="module")
def verifier(verifier_model):
    return Verifier(verifier_model, AUX)  # KV-cached


@pytest.fixture(scope="module")
def random_draft(tiny_llama):
    torch.manual_seed(0)
    cfg = Eagle3Config.from_verifier_config(AutoConfig.from_pretrained(tiny_llama), speculative_tokens=3)
    return Eagle3DraftModel(cfg).eval()


def test_greedy_accept_counts_the_matching_prefix():
    assert greedy_accept([1, 2, 3], [1, 2, 4]) == 2
    assert greedy_accept([9, 2], [1, 2]) == 0
    assert greedy_accept([1, 2], [1, 2]) == 2


@pytest.mark.parametrize("k,use_cache", [(1, True), (3, True), (3, False)])
def test_greedy_speculative_equals_plain_greedy(verifier_model, random_draft, tiny_llama, k, use_cache):
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    verifier = Verifier(verifier_model, AUX, use_cache=use_cache)
    for prompt in PROMPTS:
        for proposer in (Eagle3Proposer(random_draft, verifier.vocab_size), VerifierProposer(verifier)):
            got = speculative_generate(verifier, proposer, prompt, 20, k)
            assert got.tokens == greedy_generate(verifier, prompt, 20)
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, min_new_tokens=20,
                          pad_token_id=0)[0, len(prompt):].tolist()
        assert got.tokens == ref


def test_eos_stops_generation_at_the_same_place(verifier, random_draft):
    prompt = PROMPTS[0]
    plain = greedy_generate(verifier, prompt, 20)
    eos = plain[6]
    spec = speculative_generate(verifier, Eagle3Proposer(random_draft, verifier.vocab_size), prompt, 20, 3,
                                eos_token_ids=[eos])
    assert spec.tokens == greedy_generate(verifier, prompt, 20, eos_token_ids=[eos])
    assert spec.tokens[-1] == eos and len(spec.tokens) <= 7


def test_acceptance_bookkeeping_with_an_oracle_and_a_random_draft(verifier, random_draft):
    k = 3
    oracle = speculative_generate(verifier, VerifierProposer(verifier), PROMPTS[1], 25, k)
    c = oracle.counts
    assert c.num_accepted_tokens == c.num_draft_tokens == k * c.num_drafts
    assert c.accepted_per_pos == [c.num_drafts] * k
    # 1 first token + (k + 1) per step: fewer verifier forwards than tokens
    assert oracle.verifier_forwards == 1 + c.num_drafts < len(oracle.tokens)
    # the per-step record (eval --output-streams) adds up to the counts and to the tokens made
    assert oracle.accepted == [k] * c.num_drafts
    made = 1 + sum(a + 1 for a in oracle.accepted)  # first token, then accepted + the verifier's per step
    assert made - (k + 1) < len(oracle.tokens) <= made  # the last step may overshoot max_new_tokens
    rnd = speculative_generate(verifier, Eagle3Proposer(random_draft, verifier.vocab_size), PROMPTS[1], 25, k)
    assert rnd.counts.num_accepted_tokens <= 2  # a random draft almost never matches
    assert len(rnd.tokens) == 25
    assert len(rnd.accepted) == rnd.counts.num_drafts and sum(rnd.accepted) == rnd.counts.num_accepted_tokens


def test_eagle3_proposer_matches_the_models_own_greedy_chain(verifier, random_draft):
    seq = PROMPTS[1]
    logits, aux, _ = verifier(seq)
    ids = torch.tensor(seq + [int(logits[-1].argmax())])
    tokens, q = Eagle3Proposer(random_draft, verifier.vocab_size).propose(ids, aux, 4)
    ref, _ = random_draft.propose(aux[None].float(), ids[1:][None], 4, start_position=1)
    assert q is None and tokens.tolist() == ref[0].tolist()


def test_rejection_rule_preserves_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]])
    q = torch.tensor([[0.1, 0.6, 0.1, 0.2]])
    n = 20000
    counts = torch.zeros(4)
    accepted = 0
    for _ in range(n):
        d = torch.multinomial(q[0], 1, generator=g)
        a, nxt = rejection_sample(p, q, d, g)
        first = int(d[0]) if a == 1 else nxt
        counts[first] += 1
        accepted += a
    assert torch.allclose(counts / n, p[0], atol=0.015)
    # acceptance probability is sum(min(p, q))
    assert accepted / n == pytest.approx(float(torch.minimum(p[0], q[0]).sum()), abs=0.015)


def test_sampling_loop_accepts_everything_when_the_draft_is_the_verifier(verifier):
    g = torch.Generator().manual_seed(1)
    res = speculative_generate(verifier, VerifierProposer(verifier), PROMPTS[0], 12, 2, temperature=0.8,
                               generator=g)
    assert res.counts.num_accepted_tokens == res.counts.num_draft_tokens
    assert len(res.tokens) == 12


def test_sampling_needs_draft_probabilities(verifier, random_draft):
    class NoQ:
        def propose(self, input_ids, aux_hidden, k, temperature=0.0, generator=None):
            return torch.zeros(k, dtype=torch.long), None

    with pytest.raises(ValueError, match="probabilities"):
        speculative_generate(verifier, NoQ(), PROMPTS[0], 5, 2, temperature=1.0)
    g = torch.Generator().manual_seed(0)
    res = speculative_generate(verifier, Eagle3Proposer(random_draft, verifier.vocab_size), PROMPTS[0], 8, 2,
                               temperature=1.0, generator=g)
    assert len(res.tokens) == 8


def test_cached_draft_prefix_gives_the_same_proposals(verifier, random_draft):
    """Along a generation, the draft's cached prefix (drafted entries truncated) matches a recompute."""
    cached = Eagle3Proposer(random_draft, verifier.vocab_size, use_cache=True)
    fresh = Eagle3Proposer(random_draft, verifier.vocab_size, use_cache=False)
    seq = list(PROMPTS[1])
    verifier.reset()
    for step in range(4):
        logits, aux, _ = verifier(seq)
        ids = torch.tensor(seq + [int(logits[-1].argmax())])
        a, _ = cached.propose(ids, aux, 3)
        b, _ = fresh.propose(ids, aux, 3)
        assert a.tolist() == b.tolist(), step
        seq = ids.tolist() + a[: step % 3].tolist()  # accept a varying prefix of the draft

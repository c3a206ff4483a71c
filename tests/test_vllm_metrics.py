"""Reading vLLM's spec-decode Prometheus counters into the evaluation report."""

import pytest

from speculators.errors import UserError
from speculators.evaluate.report import SpecDecodeCounts, build_report
from speculators.vllm.metrics import parse_prometheus_text, report_from_metrics, spec_decode_counts

# Shaped like prometheus_client output of vLLM: counters with _total and _created,
# one engine label per engine, a per-position counter, unrelated metrics around.
METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="/models/verifier"} 1.0
# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_total counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="/models/verifier"} 100.0
vllm:spec_decode_num_drafts_total{engine="1",model_name="/models/verifier"} 50.0
vllm:spec_decode_num_drafts_created{engine="0",model_name="/models/verifier"} 1.7e+09
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="/models/verifier"} 300.0
vllm:spec_decode_num_draft_tokens_total{engine="1",model_name="/models/verifier"} 150.0
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="/models/verifier"} 180.0
vllm:spec_decode_num_accepted_tokens_total{engine="1",model_name="/models/verifier"} 45.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="/models/verifier",position="0"} 90.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="/models/verifier",position="1"} 60.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="/models/verifier",position="2"} 30.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="1",model_name="/models/verifier",position="0"} 30.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="1",model_name="/models/verifier",position="1"} 10.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="1",model_name="/models/verifier",position="2"} 5.0
http_requests_total{handler="/metrics",method="GET",status="2xx"} 3.0 1700000000000
"""


def test_parser_reads_labels_escapes_and_timestamps():
    samples = parse_prometheus_text('a_b{x="q\\"uote",y="1"} 2.5\n# c\nz 1e3 123\n')
    assert samples == [("a_b", {"x": 'q"uote', "y": "1"}, 2.5), ("z", {}, 1000.0)]
    with pytest.raises(UserError, match="Prometheus text format"):
        parse_prometheus_text("not a sample line at all {")


def test_model_name_filters_on_the_label_vllm_writes():
    """vLLM labels spec-decode counters with the verifier, not the served (speculator) id."""
    assert spec_decode_counts(METRICS, "/models/verifier").num_drafts == 150
    with pytest.raises(UserError, match=r"carry model_name \['/models/verifier'\], not '/ckpt'"):
        spec_decode_counts(METRICS, "/ckpt")


def test_counts_sum_over_engines_and_ignore_created():
    c = spec_decode_counts(METRICS)
    assert (c.num_drafts, c.num_draft_tokens, c.num_accepted_tokens) == (150, 450, 225)
    assert c.accepted_per_pos == [120, 70, 35]


def test_report_matches_vllm_definitions():
    r = report_from_metrics(METRICS)
    assert r["source"] == "vllm"
    assert r["mean_acceptance_length"] == pytest.approx(1 + 225 / 150)
    assert r["acceptance_rate_per_position"] == pytest.approx([120 / 150, 70 / 150, 35 / 150])
    assert r["draft_acceptance_rate"] == pytest.approx(225 / 450)
    assert r["num_speculative_tokens"] == 3
    # Window between two scrapes.
    before = SpecDecodeCounts(100, 300, 150, [80, 50, 20])
    w = report_from_metrics(METRICS, since=before)
    assert w["num_drafts"] == 50 and w["mean_acceptance_length"] == pytest.approx(1 + 75 / 50)


def test_report_shape_is_shared_with_pytorch_eval():
    c = SpecDecodeCounts()
    c.observe(3, 2)
    c.observe(3, 0)
    r = build_report(c, "pytorch", num_speculative_tokens=3, draft_cost=0.1)
    assert set(report_from_metrics(METRICS)) <= set(r)
    assert r["acceptance_rate_per_position"] == [0.5, 0.5, 0.0]
    assert r["mean_acceptance_length"] == 2.0
    assert r["speedup_at_draft_cost"] == pytest.approx(2.0 / 1.3)


def test_metrics_without_spec_decode_is_a_user_error():
    with pytest.raises(UserError, match="spec_decode"):
        spec_decode_counts("vllm:num_requests_running 0\n")

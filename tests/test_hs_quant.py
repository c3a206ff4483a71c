"""fp8 (e4m3, per-row scale) storage of hidden states: the math against a brute-force reference,
the pt and safetensors layouts reading it back as bf16, datagen's --hidden-states-dtype, the
online cache, old stores reading as before and clear errors for bad values."""

from __future__ import annotations

import json

import pytest
import torch

from speculators.cli import main as cli_main
from speculators.config.datagen import DatagenConfig
from speculators.data import data_config as dc
from speculators.data.formats import (
    CorruptSampleError,
    PtSampleStore,
    SafetensorsSampleStore,
    convert_pt_to_safetensors,
    open_sample_store,
    write_pt_sample,
)
from speculators.data.hs_quant import bytes_per_token, dequantise_rows, quantise_rows, storage_of
from speculators.data.prepare import PrepareConfig, load_prepared, prepare_data
from speculators.datagen.runner import run_datagen
from speculators.errors import UserError

from tests.support.chat_data import write_qa_chats


def e4m3_values() -> torch.Tensor:
    """Every finite float8_e4m3fn value, decoded from its bits by the format's definition
    (1 sign, 4 exponent bits with bias 7, 3 mantissa bits; S.1111.111 is NaN)."""
    out = []
    for bits in range(256):
        sign = -1.0 if bits & 0x80 else 1.0
        exp, man = (bits >> 3) & 0xF, bits & 0x7
        if exp == 0xF and man == 0x7:
            continue
        value = man / 8 * 2.0 ** -6 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7)
        out.append(sign * value)
    return torch.tensor(sorted(set(out)), dtype=torch.float64)


def test_quantise_matches_a_brute_force_nearest_value_and_the_scale_is_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(33, 64, generator=g, dtype=torch.float64) * torch.logspace(-3, 3, 33, dtype=torch.float64)[:, None]
    x[5] = 0.0  # an all-zero row
    x[7, 3] = 1e-9  # far below the row's subnormal range
    q, scale = quantise_rows(x.to(torch.float32))
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (33,)
    amax = x.to(torch.float32).abs().amax(-1)
    expected_scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    assert torch.equal(scale, expected_scale)  # exactly max|row| / 448, and 1 for the zero row
    assert scale[5] == 1.0 and torch.equal(q[5].float(), torch.zeros(64))
    grid = e4m3_values()
    assert grid.max() == 448.0
    y = x.to(torch.float32).double() / scale.double()[:, None]
    nearest = grid[(y.unsqueeze(-1) - grid).abs().argmin(-1)]
    got = q.double()
    # Round to nearest: the stored value is one of the (at most two) nearest grid values.
    assert torch.all((got - y).abs() <= (nearest - y).abs() + 1e-12)
    # Round trip: within |x|/16 in the normal range, s/1024 in the subnormal range.
    back = dequantise_rows(q, scale, torch.float32).double()
    bound = torch.maximum(x.abs() / 16, scale.double()[:, None] / 1024)
    assert torch.all((back - x.to(torch.float32).double()).abs() <= bound * (1 + 1e-6))
    # The row maximum itself is stored exactly (it maps to 448).
    rows = torch.arange(33)
    arg = x.abs().argmax(-1)
    nonzero = rows != 5
    assert torch.allclose(back[rows, arg][nonzero], x.to(torch.float32).double()[rows, arg][nonzero], rtol=1e-6)
    assert dequantise_rows(q, scale).dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["fp8_to_float", "fp8_bits_to_float"])
def test_fp8_to_float_is_exact_for_every_bit_pattern(name):
    from speculators.data import hs_quant

    convert = getattr(hs_quant, name)
    every = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    finite = ~every.float().isnan()
    got = convert(every)[finite]
    assert torch.equal(got.view(torch.int32), every.float()[finite].view(torch.int32))  # -0 stays -0
    assert torch.equal(got.view(torch.int32), hs_quant.fp8_to_float(every)[finite].view(torch.int32))
    assert sorted(set(got.double().tolist())) == e4m3_values().tolist()


def test_recorded_dtype_names_and_bytes_per_token():
    assert storage_of(None, "f") == "bf16" == storage_of("bfloat16", "f") == storage_of("float32", "f")
    assert storage_of("float8_e4m3fn", "f") == "fp8"
    with pytest.raises(UserError, match=r"cfg.json: hidden_states.dtype 'int4' is not supported"):
        storage_of("int4", "cfg.json")
    assert bytes_per_token(4096, 1, "bf16") == 8192 and bytes_per_token(4096, 1, "fp8") == 4100


def _sample(length: int, hidden: int, layers: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 100, (length,), generator=g),
            "loss_mask": torch.ones(length, dtype=torch.long),
            "hidden_states": [torch.randn(length, hidden, generator=g).to(torch.bfloat16) for _ in range(layers)]}


def _write_store(directory, samples, storage):
    directory.mkdir(parents=True)
    for i, s in enumerate(samples):
        write_pt_sample(directory, i, s, storage=storage)
    config = {"version": 1, "format": "pt", "layer_ids": [1, 2, 4], "hidden_size": 32, "num_hidden_layers": 4}
    if storage is not None:
        config["hidden_states_dtype"] = {"bf16": "bfloat16", "fp8": "float8_e4m3fn"}[storage]
    dc.write(directory / "data_config.json", config)


def test_pt_and_safetensors_read_fp8_back_as_bf16_and_old_stores_as_before(tmp_path):
    samples = [_sample(7 + i, 32, 3, i) for i in range(3)]
    _write_store(tmp_path / "old", samples, None)  # no dtype recorded: a store from before fp8
    _write_store(tmp_path / "fp8", samples, "fp8")
    old, fp8 = open_sample_store(tmp_path / "old"), open_sample_store(tmp_path / "fp8")
    assert isinstance(fp8, PtSampleStore) and fp8.storage == "fp8" and old.storage == "bf16"
    raw = torch.load(tmp_path / "fp8" / "data_1.pt", weights_only=True)
    assert raw["hidden_states"][0].dtype == torch.float8_e4m3fn and raw["hidden_states_scale"][0].shape == (8,)
    convert_pt_to_safetensors(tmp_path / "fp8", tmp_path / "st")
    st = open_sample_store(tmp_path / "st")
    assert isinstance(st, SafetensorsSampleStore) and st.storage == "fp8"
    header = (tmp_path / "st" / st.config["shards"][0]["file"]).read_bytes()
    assert b'"F8_E4M3"' in header  # the shards keep fp8, not a second rounding through bf16
    for i, s in enumerate(samples):
        a, b, c = old.load(i), fp8.load(i), st.load(i)
        assert all(torch.equal(x, y) for x, y in zip(a["hidden_states"], s["hidden_states"]))
        for x, y, z in zip(s["hidden_states"], b["hidden_states"], c["hidden_states"]):
            assert y.dtype == z.dtype == torch.bfloat16 and torch.equal(y, z)
            q, scale = quantise_rows(x)  # the direct computation, then bf16
            assert torch.equal(y, (q.double() * scale.double()[:, None]).to(torch.bfloat16))
            assert torch.all((y.float() - x.float()).abs() <= x.float().abs() / 16 + scale[:, None] / 1024 + 1e-2 * x.float().abs())
        assert torch.equal(b["input_ids"], s["input_ids"]) and torch.equal(c["loss_mask"], s["loss_mask"])
    # what the files hold per token: (H + 4) bytes per layer in fp8, 2H in bf16
    for name, storage in (("old", "bf16"), ("fp8", "fp8")):
        held = torch.load(tmp_path / name / "data_2.pt", weights_only=True)
        nbytes = sum(t.numel() * t.element_size() for t in held["hidden_states"] + held.get("hidden_states_scale", []))
        assert nbytes == 9 * bytes_per_token(32, 3, storage) == 9 * 3 * (64 if storage == "bf16" else 36)


def test_a_store_whose_files_disagree_with_its_record_or_names_a_bad_dtype_is_refused(tmp_path):
    samples = [_sample(6, 32, 3, 0)]
    _write_store(tmp_path / "a", samples, "bf16")
    cfg = json.loads((tmp_path / "a" / "data_config.json").read_text())
    cfg["hidden_states"]["dtype"] = "float8_e4m3fn"  # recorded fp8, files unscaled
    (tmp_path / "a" / "data_config.json").write_text(json.dumps(cfg))
    store = open_sample_store(tmp_path / "a", on_corrupt="raise")
    with pytest.raises(CorruptSampleError, match=r"data_0.pt: holds unscaled hidden states, data_config.json records fp8"):
        store.load(0)
    cfg["hidden_states"]["dtype"] = "int4"
    (tmp_path / "a" / "data_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"data_config.json: hidden_states.dtype 'int4' is not supported"):
        open_sample_store(tmp_path / "a")


@pytest.fixture(scope="module")
def prep(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("prep_fp8")
    chats = [[("What is 2+2?", "4, of course.")], [("Name a colour", "Blue is a colour many like.")],
             [("Count to five", "one two three four five")]]
    path = write_qa_chats(d / "chats.jsonl", chats)
    prepare_data(PrepareConfig(model=str(tiny_llama), data=str(path), output=str(d / "prep"), seq_length=48))
    return d / "prep"


def test_datagen_fp8_flag_records_the_dtype_reads_back_and_refuses_a_mixed_resume(tiny_llama, prep, tmp_path, capsys):
    common = dict(target_model_path=str(tiny_llama), train_data_path=str(prep), device="cpu", batch_size=2)
    run_datagen(DatagenConfig(output_dir=str(tmp_path / "bf16"), **common))
    rc = cli_main(["datagen", "--target-model-path", str(tiny_llama), "--train-data-path", str(prep),
                   "--output-dir", str(tmp_path / "fp8"), "--device", "cpu", "--hidden-states-dtype", "fp8",
                   "--format", "safetensors"])
    assert rc == 0
    nested = json.loads((tmp_path / "fp8" / "data_config.json").read_text())
    assert nested["hidden_states"]["dtype"] == "float8_e4m3fn"
    assert "hidden_states_scale" in nested["format"]["schema"]
    bf, f8 = open_sample_store(tmp_path / "bf16"), open_sample_store(tmp_path / "fp8")
    assert len(bf) == len(f8) == len(load_prepared(prep))
    for i in range(len(bf)):
        for x, y in zip(bf.load(i)["hidden_states"], f8.load(i)["hidden_states"]):
            q, s = quantise_rows(x)
            assert y.dtype == torch.bfloat16 and torch.equal(y, dequantise_rows(q, s))
    # resuming a bf16 directory in fp8 would mix the two: refused, naming the flag
    with pytest.raises(UserError, match=r"stored as bfloat16, this run stores float8_e4m3fn \(--hidden-states-dtype\)"):
        run_datagen(DatagenConfig(output_dir=str(tmp_path / "bf16"), hidden_states_dtype="fp8", **common))
    with pytest.raises(SystemExit) as exited:
        cli_main(["datagen", "--target-model-path", str(tiny_llama), "--train-data-path", str(prep),
                  "--output-dir", str(tmp_path / "x"), "--hidden-states-dtype", "fp4"])
    assert exited.value.code == 2
    assert "--hidden-states-dtype: invalid choice: 'fp4'" in capsys.readouterr().err


# ---------------------------------------------------------------- dequantised where the step runs
def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns (bitwise comparison: +0 and -0 differ)."""
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantise_groups_equals_the_host_dequantisation_bit_for_bit(native, dtype):
    """One pass over a [B, T, G*H] payload equals `dequantise_rows` per group (the host reference),
    every finite e4m3 pattern, zero rows and scales from 1e-30 to 1e3 included."""
    from speculators.data.hs_quant import dequantise_groups

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 3, 16, generator=g) * torch.logspace(-30, 3, 30).view(2, 5, 3, 1)
    x[0, 1, 2] = 0.0
    q, s = quantise_rows(x)
    every = torch.arange(256, dtype=torch.uint8)
    every = every[~every.view(torch.float8_e4m3fn).float().isnan()]
    q.view(torch.uint8)[1, 4, :, :] = every[torch.randint(0, every.numel(), (3, 16), generator=g)]
    want = torch.stack([dequantise_rows(q[:, :, k], s[:, :, k], dtype) for k in range(3)], dim=2)
    got = dequantise_groups(q.view(torch.uint8).reshape(2, 5, 48), s, dtype, native=native)
    assert got.dtype == dtype and got.shape == (2, 5, 48)
    assert torch.equal(_bits(got), _bits(want.reshape(2, 5, 48)))
    with pytest.raises(ValueError, match=r"fp8 payload \(2, 5, 48\) does not fit its scales \(2, 5, 5\)"):
        dequantise_groups(q.view(torch.uint8).reshape(2, 5, 48), torch.ones(2, 5, 5))


def _reencode(src, dst, storage):
    """`src` written again with `storage` hidden states (what datagen --hidden-states-dtype writes);
    storage None writes the host-dequantised values of an fp8 `src` as a bf16 store (the reference)."""
    store = open_sample_store(src, on_corrupt="raise")
    dst.mkdir(parents=True)
    for i in range(len(store)):
        write_pt_sample(dst, store.sample_indices[i], store.load(i), storage=storage or "bf16")
    config = dict(store.config)
    config["hidden_states_dtype"] = "float8_e4m3fn" if storage == "fp8" else "bfloat16"
    dc.write(dst / "data_config.json", config)
    return dst


@pytest.mark.parametrize("algorithm", ["eagle3", "dflash"])
def test_training_on_fp8_data_equals_training_on_the_host_dequantised_data(algorithm, tiny_llama, hs_data, tmp_path):
    """The trainer's steps and validation on an fp8 store (payload to the step, dequantised there)
    equal, bit for bit, those on a bf16 store holding the host's dequantised values; the DataLoader
    (here with a worker process) hands over the fp8 payload, not dequantised values."""
    from speculators.train.components import build_components
    from speculators.train.distributed import DistInfo
    from speculators.train.trainer import Trainer

    from tests.support.train_helpers import make_cfg, train_losses

    fp8 = _reencode(hs_data, tmp_path / "fp8", "fp8")
    ref = _reencode(fp8, tmp_path / "ref", None)
    kw = dict(epochs=1, algorithm=algorithm, ttt_steps=2)
    runs = {}
    for name, data, workers in (("fp8", fp8, 1), ("ref", ref, 0)):
        trainer = Trainer(build_components(make_cfg(tiny_llama, data, tmp_path / f"run_{name}", num_workers=workers,
                                                    **kw), DistInfo()))
        first = next(iter(trainer.data.epoch_loader(trainer.data.plan(0), 0)))
        if name == "fp8":
            assert first["hidden_states"].dtype == torch.uint8 and first["hidden_states_scale"].dtype == torch.float32
            assert first["verifier_last_hidden_states"].dtype == torch.uint8
        else:
            assert first["hidden_states"].dtype == torch.float32 and "hidden_states_scale" not in first
        trainer.fit()
        runs[name] = (trainer, train_losses(tmp_path / f"run_{name}"))
    (a, la), (b, lb) = runs["fp8"], runs["ref"]
    assert la and la == lb
    for (n, p), (_, r) in zip(a.draft.named_parameters(), b.draft.named_parameters()):
        assert torch.equal(p, r), n
    def validation(run):  # the val records' metrics, throughput (timing) left out
        records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r["metrics"].items() if "per_s" not in k} for r in records if r["type"] == "val"]

    assert validation("run_fp8") and validation("run_fp8") == validation("run_ref")


def test_a_batch_mixing_fp8_and_unscaled_samples_is_dequantised_on_the_host(tmp_path):
    from speculators.data.dataset import Eagle3Collator, shift_sample
    from speculators.train.step_data import to_device

    samples = [_sample(9, 32, 3, i) for i in range(3)]
    _write_store(tmp_path / "fp8", samples, "fp8")
    fp8 = open_sample_store(tmp_path / "fp8")
    stored = [shift_sample(fp8.load_stored(i)) for i in range(3)]
    host = [shift_sample(fp8.load(i)) for i in range(3)]  # the host reference (bf16)
    collate = Eagle3Collator(20)
    mixed = collate([stored[0], host[1], stored[2]])
    assert mixed["hidden_states"].dtype == torch.bfloat16 and "hidden_states_scale" not in mixed
    want = collate(host)
    payload = to_device(collate(stored), torch.device("cpu"), torch.bfloat16)
    for k in want:
        assert torch.equal(mixed[k], want[k]) and torch.equal(payload[k], want[k]), k
    assert set(payload) == set(want)


def test_eval_and_acceptance_prompts_of_an_fp8_store_are_those_of_its_bf16_source(hs_data, tmp_path):
    """Prompts need only the tokens: read as stored (no dequantisation), the same as from bf16."""
    from speculators.evaluate.runner import prompts_from_samples
    from speculators.train.acceptance import heldout_prompts

    fp8 = _reencode(hs_data, tmp_path / "fp8", "fp8")
    want = prompts_from_samples(hs_data)
    assert want and prompts_from_samples(fp8) == want
    held = heldout_prompts(open_sample_store(hs_data), range(12), 5)
    assert held and heldout_prompts(open_sample_store(fp8), range(12), 5) == held

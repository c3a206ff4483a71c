"""One typed schema for a run: the CLI, the dashboard form and the worker's stage settings
agree, bad input is refused at the form with the CLI's rules, runs that cannot fit in memory
are refused before they start (form and CLI, with the estimate in the message), and every
command reads a `--config` settings file the same way (the worker hands its stages one)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from runstore import open_store, runs
from runstore.settings import Settings
from speculators.cli import build_parser
from speculators.cli import main as cli_main
from speculators.config.base import bounds_of, to_argv
from speculators.config.files import add_config_option, parse_args, write_settings_file
from speculators.config.datagen import DatagenConfig
from speculators.config.prepare import PrepareConfig
from speculators.config.regenerate import RegenConfig
from speculators.config.vocab import VocabConfig
from speculators.config.memory import check_train_memory
from speculators.config.run import CPU_PRESET, RunSettings
from speculators.config.train import TrainConfig
from speculators.errors import UserError
from speculators.config.stages import StagePaths, pipeline_stages, stage_args
from speculators.train.cli import add_train_arguments, config_from_args
from worker.pipeline import stage_argv
from worker.spec import validate_spec

ROOT = Path(__file__).resolve().parent.parent
FORM = ROOT / "app" / "pages" / "1_New_run.py"
# the run settings that are the trainer's own settings (run name -> train name)
SHARED = {"epochs": "epochs", "lr": "lr", "ttt_steps": "ttt_steps", "num_layers": "num_layers", "seed": "seed",
          "seq_length": "total_seq_len", "eval_every_steps": "eval_every_steps", "eval_prompts": "eval_prompts",
          "eval_max_tokens": "eval_max_tokens", "best_by": "best_by", "checkpoint_every_steps": "checkpoint_every_steps",
          "algorithm": "algorithm", "optimizer": "optimizer", "loss": "loss",
          "gradient_checkpointing": "gradient_checkpointing", "freeze_lm_head": "freeze_lm_head"}
# the run settings that are another stage's own settings: run name -> (subcommand, its config, field)
STAGE_SHARED = {
    "max_samples": ("prepare-data", PrepareConfig, "max_samples"),
    "draft_vocab_size": ("build-vocab-mapping", VocabConfig, "draft_vocab_size"),
    "batch_size": ("datagen", DatagenConfig, "batch_size"),
    "hidden_states_dtype": ("datagen", DatagenConfig, "hidden_states_dtype"),
    "regenerate_backend": ("regenerate", RegenConfig, "backend"),
    "regenerate_max_tokens": ("regenerate", RegenConfig, "max_tokens"),
    "regenerate_temperature": ("regenerate", RegenConfig, "temperature"),
    "regenerate_max_turns": ("regenerate", RegenConfig, "max_turns"),
    "regenerate_max_prompt_tokens": ("regenerate", RegenConfig, "max_prompt_tokens"),
    "regenerate_concurrency": ("regenerate", RegenConfig, "concurrency"),
}
# a run's own starting value where the command has none that fits a run (documented in config/run.py)
RUN_DEFAULTS = {"max_samples": 5000, "draft_vocab_size": 32000}
# the least each subcommand needs besides the flag under test
REQUIRED = {
    "prepare-data": ["--model", "m", "--data", "sharegpt", "--output", "OUT", "--seq-length", "64"],
    "build-vocab-mapping": ["--token-freq-path", "f.pt", "--draft-vocab-size", "64", "--output-path", "OUT",
                            "--target-vocab-size", "512"],
    "datagen": ["--target-model-path", "m", "--train-data-path", "p", "--output-dir", "OUT"],
    "regenerate": ["--model", "m", "--data", "sharegpt", "--output", "OUT"],
}
TINY_CONFIG = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
               "vocab_size": 512, "num_hidden_layers": 8}


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    return p


def parse_train(argv: list[str]) -> TrainConfig:
    """What `speculators train` makes of an argument list (the real parser and config)."""
    assert argv[0] == "train"
    return config_from_args(parse_args(build_parser(), argv))


def worker_stage(spec: RunSettings, stage: str, paths: StagePaths, **kw) -> argparse.Namespace:
    """What the worker's process for `stage` parses: the command line only names the settings
    file in the run's folder; the real CLI reads it (`python -m speculators.train` under torchrun)."""
    argv = stage_argv(spec, stage, paths, python="py", **kw)
    if argv[1:3] == ["-m", "torch.distributed.run"]:
        assert argv[argv.index("-m", 3):][:2] == ["-m", "speculators.train"]
        args = ["train", *argv[argv.index("speculators.train") + 1:]]
    else:
        assert argv[:3] == ["py", "-m", "speculators"]
        args = argv[3:]
    assert args[1:] == ["--config", str(paths.work_dir / "settings" / f"{stage}.json")]
    return parse_args(build_parser(), args)


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEC_HOME", str(tmp_path))
    monkeypatch.setenv("SPEC_BROKER_URL", "redis://127.0.0.1:1/0")  # broker down: runs stay in the outbox
    monkeypatch.setenv("SPEC_MAX_GPUS", "1")  # no CPU preset: the form starts from the schema's defaults
    for k in ("SPEC_DB_URL", "SPEC_DATA_ROOT", "SPEC_RUNS_ROOT", "SPEC_MODELS_ROOT", "SPEC_DEFAULT_MODEL"):
        monkeypatch.delenv(k, raising=False)
    s = Settings.from_env()
    s.ensure_dirs()
    model = s.models_root / "tiny-llama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_CONFIG))
    chat = '{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}\n'
    (s.data_root / "chats.jsonl").write_text(chat * RUN_DEFAULTS["max_samples"])  # as many as a run asks
    return s


def form(home) -> AppTest:
    at = AppTest.from_file(str(FORM), default_timeout=30).run()
    assert not at.exception
    at.radio(key="f_source").set_value("File under data root").run()
    at.text_input(key="f_path").set_value("chats.jsonl")
    at.text_input(key="f_draft_vocab_size").set_value("128")  # the tiny verifier's vocabulary is 512
    return at


def widget_value(at: AppTest, name: str):
    for kind in (at.number_input, at.text_input, at.radio, at.checkbox):
        try:
            return kind(key=f"f_{name}").value
        except KeyError:
            continue
    raise AssertionError(f"no widget f_{name} on the form")


def good(home, **over) -> dict:
    raw = {"name": "r", "model": str(home.models_root / "tiny-llama"), "dataset": "chats.jsonl", "seq_length": 64,
           "max_samples": 8, "draft_vocab_size": 128, "epochs": 1, "lr": "1e-3", "ttt_steps": 2, "num_layers": 1,
           "mode": "offline", "gpus": 0}
    raw.update(over)
    return raw


# --------------------------------------------------------------- one source of defaults/bounds
def test_form_cli_and_worker_share_defaults(home):
    """The form's initial values, `speculators train`'s defaults and the worker's train argv
    all carry the schema's defaults (ttt_steps was 2 in the form and 3 in the trainer)."""
    cli_defaults = train_parser().parse_args(["--verifier-name-or-path", "m"])
    at = form(home)
    at.button[0].click().run()
    with open_store(home.db_url)() as s:
        (run,) = runs.list_runs(s)
    stored = RunSettings.from_dict(run.spec)
    assert stored.gpus == 1  # trains under torchrun
    worker_cfg = config_from_args(worker_stage(stored, "train", StagePaths(Path(home.runs_root) / "x")))
    for run_name, train_name in SHARED.items():
        expected = getattr(cli_defaults, train_name)
        form_value = widget_value(at, run_name)
        assert type(expected)(form_value) == expected, run_name
        assert getattr(stored, run_name) == expected, run_name
        assert getattr(worker_cfg, train_name) == expected, run_name
    assert stored.ttt_steps == TrainConfig.model_fields["ttt_steps"].default == 3


@pytest.mark.parametrize("run_name,train_name,bad", [
    ("ttt_steps", "ttt_steps", 17), ("epochs", "epochs", 0), ("lr", "lr", 2.0), ("seq_length", "total_seq_len", 8),
    ("num_layers", "num_layers", 17),
])
def test_form_and_cli_refuse_the_same_bounds(home, run_name, train_name, bad):
    flag = "--" + train_name.replace("_", "-")
    with pytest.raises(UserError, match=flag) as cli_err:
        parse_train(["train", "--verifier-name-or-path", "m", f"{flag}={bad}"])
    spec, errors = validate_spec(good(home, **{run_name: bad}), home)
    assert spec is None and run_name in errors
    assert errors[run_name] in str(cli_err.value)  # the same message, from the same field


def test_cpu_preset_only_names_schema_fields_and_validates():
    RunSettings(name="n", model="m", dataset="sharegpt", **CPU_PRESET)
    assert set(CPU_PRESET) <= set(RunSettings.model_fields)


def test_every_train_flag_round_trips_through_the_worker_argv(tmp_path):
    """A TrainConfig written as argv and parsed by `speculators train` is the same config."""
    cfg = TrainConfig(
        verifier_name_or_path="m", data_path=str(tmp_path), epochs=3, lr=2.5e-4, ttt_steps=5, resume=False,
        norm_before_residual=False, vllm_layer_ids=[1, 3, 8], scheduler="linear", warmup_ratio=0.2,
        weight_decay=0.1, max_grad_norm=0.5, rows_per_batch=2, num_workers=1, metrics_file=str(tmp_path / "m.jsonl"),
        ttt_step_loss_decay=0.8, checkpoint_every_steps=7, keep_last_checkpoints=2, run_name="-starts-with-dash",
        prefetch=3, vllm_timeout=9.5,
        optimizer="muon", muon_lr=2e-3, muon_momentum=0.9, muon_adjust_lr="original", loss="lk", lk_eta=2.5,
        gradient_checkpointing=True, freeze_lm_head=True,
    )
    from speculators.config.base import to_argv

    assert parse_train(["train", *to_argv(cfg)]) == cfg


def test_trainer_checkpoint_flags_are_in_the_schema():
    p = train_parser()
    args = p.parse_args(["--verifier-name-or-path", "m", "--checkpoint-every-steps", "5",
                         "--keep-last-checkpoints", "2"])
    cfg = config_from_args(args)
    assert (cfg.checkpoint_every_steps, cfg.keep_last_checkpoints) == (5, 2)
    defaults = config_from_args(p.parse_args(["--verifier-name-or-path", "m"]))
    assert (defaults.checkpoint_every_steps, defaults.keep_last_checkpoints) == (0, 0)


# --------------------------------------------------------------- refused at the form
def test_run_name_starting_with_dash(home, tmp_path):
    spec, errors = validate_spec(good(home, name="-rf"), home)
    assert spec is None and "must not start with '-'" in errors["name"]
    # argv stays robust even for a value that starts with '-': --run-name=-x is one argument
    cfg = TrainConfig(verifier_name_or_path="m", run_name="--epochs")
    from speculators.config.base import to_argv

    assert parse_train(["train", *to_argv(cfg)]).run_name == "--epochs"


def layer_rule(ids: list[int], n: int = 8) -> str | None:
    """The layer-id rule, written out independently: the final layer n is appended when absent;
    then every id in [0, n], no repeats, ascending, n last, and at least one aux layer. The
    word the refusal must contain, or None when the ids are accepted."""
    full = ids + ([n] if n not in ids else [])
    if any(not 0 <= i <= n for i in full):
        return "out of range"
    if len(set(full)) != len(full):
        return "repeats"
    if full != sorted(full):
        return "ascending"
    if len(full) < 2:
        return "aux layer"
    return None


def test_layer_ids_refused_at_the_form_by_the_rule(home):
    """Every list of one to three ids over {0, 2, 4, 7, 8, 9} against the rule above."""
    import itertools

    values = (0, 2, 4, 7, 8, 9)
    cases = [list(c) for k in (1, 2, 3) for c in itertools.product(values, repeat=k)]
    verdicts = set()
    for ids in cases:
        spec, errors = validate_spec(good(home, layer_ids=",".join(map(str, ids))), home)
        want = layer_rule(ids)
        verdicts.add(want)
        if want is None:
            assert errors == {} and spec.layer_ids == ids, ids
        else:
            assert spec is None and want in errors.get("layer_ids", ""), (ids, want, errors)
    assert verdicts == {None, "out of range", "repeats", "ascending", "aux layer"}  # every branch was met


def test_long_sequence_refused_at_the_form_with_the_estimate(home):
    at = form(home)
    at.text_input(key="f_seq_length").set_value("131072")
    at.text_input(key="f_gpus").set_value("0")  # a CPU run: checked against this machine's RAM
    at.button[0].click().run()
    (msg,) = [e.value for e in at.get("html") if "sequence length 131072" in e.value]  # a plain-text alert
    assert "GiB" in msg and "attention (T^2)" in msg and "available RAM" in msg
    with open_store(home.db_url)() as s:
        assert runs.list_runs(s) == []
    # a short run on the same model fits
    spec, errors = validate_spec(good(home, seq_length=64), home)
    assert errors == {} and spec is not None


def test_long_sequence_refused_by_the_cli_with_the_estimate(tiny_llama, tmp_path, capsys):
    rc = cli_main(["train", "--verifier-name-or-path", str(tiny_llama), "--data-path", str(tmp_path / "none"),
                   "--save-path", str(tmp_path / "ck"), "--total-seq-len", "131072"])
    err = capsys.readouterr().err
    assert rc == 2 and "--total-seq-len 131072" in err and "GiB" in err and "available RAM" in err
    assert not (tmp_path / "ck").exists()  # refused before anything was written
    cfg = TrainConfig(verifier_name_or_path=str(tiny_llama), total_seq_len=256)
    assert check_train_memory(cfg).total < 2 << 30  # a tiny run fits


def test_memory_estimate_grows_with_sequence_length_squared():
    from speculators.config.memory import VerifierDims, estimate_train_memory

    dims = VerifierDims.from_config(TINY_CONFIG)
    a = estimate_train_memory(dims, total_seq_len=4096, ttt_steps=3).parts["attention (T^2)"]
    b = estimate_train_memory(dims, total_seq_len=8192, ttt_steps=3).parts["attention (T^2)"]
    assert b == 4 * a
    flex = estimate_train_memory(dims, total_seq_len=8192, ttt_steps=3, flex=True, on_gpu=True)
    assert "attention (T^2)" not in flex.parts


# --------------------------------------------------------------- DFlash memory arithmetic
def test_dflash_parameter_bytes_are_those_of_a_built_draft():
    """Weights and optimizer state against the parameters of an actually built DFlash draft
    (2 layers, a draft vocabulary smaller than the verifier's) and the verifier head it trains on."""
    import torch
    from transformers import LlamaConfig

    from speculators.config.memory import VerifierDims, estimate_dflash_train_memory
    from speculators.models.dflash import DFlashConfig, DFlashDraftModel
    from speculators.train.verifier import VerifierHead

    vconf = LlamaConfig(**TINY_CONFIG)
    draft = DFlashDraftModel(DFlashConfig.from_verifier_config(vconf, aux_layer_ids=[1, 4, 6], block_size=8,
                                                               draft_vocab_size=200, num_layers=2))
    trainable = sum(p.numel() for p in draft.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in draft.parameters() if not p.requires_grad)
    v, h = TINY_CONFIG["vocab_size"], TINY_CONFIG["hidden_size"]
    loaded = {"embed": torch.zeros(v, h), "lm_head": torch.zeros(v, h), "norm": torch.ones(h)}
    head = VerifierHead.from_weights(loaded, draft.t2d, 1e-6)
    est = estimate_dflash_train_memory(VerifierDims.from_config(TINY_CONFIG), total_seq_len=256, block_size=8,
                                       num_layers=2, draft_vocab_size=200, num_aux_layers=3)
    assert est.parts["gradients+AdamW"] == 4 * 3 * trainable  # grads + exp_avg + exp_avg_sq, float32
    assert est.parts["weights"] == 4 * (trainable + frozen + head.weight.numel()
                                        + loaded["embed"].numel() + loaded["lm_head"].numel())
    from speculators.train.components import set_lm_head_trainable

    set_lm_head_trainable(draft, True)  # --freeze-lm-head
    frozen_est = estimate_dflash_train_memory(VerifierDims.from_config(TINY_CONFIG), total_seq_len=256, block_size=8,
                                              num_layers=2, draft_vocab_size=200, freeze_lm_head=True)
    assert frozen_est.parts["gradients+AdamW"] == 4 * 3 * sum(p.numel() for p in draft.parameters() if p.requires_grad)
    assert frozen_est.parts["weights"] == est.parts["weights"]


def test_dflash_query_count_is_the_objectives():
    """Anchors and the [Q, T + Q] mask the estimate counts are those `pick_anchors` and
    `block_mask` make for a row where every position counts (the most a row can hold)."""
    import torch

    from speculators.config.memory import dflash_queries
    from speculators.models.dflash import block_mask
    from speculators.train.dflash_objective import pick_anchors

    for t, bs, cap in ((64, 4, 512), (300, 8, 128), (100, 3, 0)):
        anchors, _keep = pick_anchors(torch.ones(2, t, dtype=torch.bool), cap, torch.Generator().manual_seed(0))
        mask = block_mask(torch.ones(2, anchors.shape[1], t, dtype=torch.bool), bs)
        n, q = dflash_queries(t, bs, cap)
        assert (anchors.shape[1], mask.shape) == (n, (2, q, t + q))


def test_dflash_estimate_differs_from_eagle3_where_it_should():
    from speculators.config.memory import VerifierDims, estimate_dflash_train_memory, estimate_train_memory

    dims = VerifierDims.from_config(TINY_CONFIG)  # GQA: 4 heads over 2 kv heads

    def dflash(t, **kw):
        return estimate_dflash_train_memory(dims, total_seq_len=t, **{"block_size": 4, **kw})

    # EAGLE-3's CPU square term is T x T per TTT step; DFlash's is (anchors x block) x (T + anchors x block),
    # linear in T once the 512 anchors cap the blocks, and growing with the block size instead
    eagle = [estimate_train_memory(dims, total_seq_len=t, ttt_steps=3).parts["attention (T^2)"] for t in (8192, 16384)]
    flash = [dflash(t).parts["attention (blocks x row)"] for t in (8192, 16384)]
    assert eagle[1] == 4 * eagle[0] and 1.5 < flash[1] / flash[0] < 2
    assert "attention (T^2)" not in dflash(8192).parts and flash[0] < eagle[0] / 3
    assert dflash(8192, block_size=8).parts["attention (blocks x row)"] > 1.8 * flash[0]
    assert dflash(8192, num_anchors=256).total < dflash(8192).total
    # on a GPU EAGLE-3's flex attention drops the square term; DFlash's masked SDPA cannot use
    # flex, and with GQA no fused kernel that takes a mask: its scores stay in the estimate
    gpu = {"on_gpu": True, "bf16": True}
    assert "attention (T^2)" not in estimate_train_memory(dims, total_seq_len=8192, ttt_steps=3, flex=True, **gpu).parts
    gqa = dflash(8192, **gpu).parts["attention (blocks x row)"]
    mha = estimate_dflash_train_memory(VerifierDims.from_config({**TINY_CONFIG, "num_key_value_heads": 4}),
                                       total_seq_len=8192, block_size=4, **gpu).parts["attention (blocks x row)"]
    assert mha < gqa / TINY_CONFIG["num_attention_heads"]  # the mask alone, no per-head scores
    # activations and loss logits: one pass over anchors x block tokens, not TTT steps x T
    a, e = dflash(8192, block_size=8), estimate_train_memory(dims, total_seq_len=8192, ttt_steps=7)
    assert a.parts["loss logits"] == 512 * 7 * 512 * 4 and e.parts["loss logits"] == 7 * 8192 * 512 * 4
    assert a.parts["activations"] < e.parts["activations"]


def test_dflash_run_refused_by_its_own_estimate_and_one_that_fits_passes(tiny_llama):
    from speculators.config.memory import read_verifier_dims, train_memory_estimate

    def cfg(**kw):
        return TrainConfig(verifier_name_or_path=str(tiny_llama), algorithm="dflash", **kw)

    big = cfg(total_seq_len=32768, ttt_steps=7)
    est = train_memory_estimate(big, read_verifier_dims(str(tiny_llama)), "cpu")
    assert check_train_memory(big, device="cpu", free=est.total).total == est.total  # just fits
    with pytest.raises(UserError) as exc:
        check_train_memory(big, device="cpu", free=est.total - 1)
    msg = str(exc.value)
    for part in ("--algorithm dflash, --total-seq-len 32768", "--ttt-steps 7: blocks of 8 tokens",
                 "--dflash-num-anchors 512", "attention (blocks x row)", "available RAM"):
        assert part in msg, (part, msg)
    assert "attention (T^2)" not in msg
    # the same shape under EAGLE-3's arithmetic would need far more: refused where DFlash fits
    eagle = TrainConfig(verifier_name_or_path=str(tiny_llama), total_seq_len=32768, ttt_steps=7)
    with pytest.raises(UserError, match="TTT steps"):
        check_train_memory(eagle, device="cpu", free=2 * est.total)
    assert check_train_memory(cfg(total_seq_len=256), device="cpu", free=1 << 30) is not None  # a tiny run fits


def test_dflash_run_refused_at_the_form_in_its_terms(home):
    spec, errors = validate_spec(good(home, algorithm="dflash", seq_length=4096), home, free_memory=1 << 20)
    assert spec is None and errors["seq_length"].startswith("DFlash, sequence length 4096")
    assert "blocks of 3 tokens" in errors["seq_length"]  # ttt_steps 2 in `good`
    spec, errors = validate_spec(good(home, algorithm="dflash", seq_length=4096), home, free_memory=64 << 30)
    assert errors == {} and spec is not None


# --------------------------------------------------------------- one stage builder
def test_regenerate_stage_runs_before_prepare(home, tmp_path):
    spec, errors = validate_spec(good(home, regenerate=True, regenerate_max_tokens=64,
                                      regenerate_temperature="0.5", regenerate_backend="vllm"), home)
    assert errors == {}
    assert pipeline_stages(spec) == ["regenerate", "prepare", "vocab", "datagen", "train"]
    paths = StagePaths(tmp_path)
    args = worker_stage(spec, "regenerate", paths)
    assert (args.command, args.model, args.data, args.output) == (
        "regenerate", spec.model, [spec.dataset], str(tmp_path / "regenerated.jsonl"))
    assert (args.backend, args.max_tokens, args.temperature, args.max_samples) == ("vllm", 64, 0.5, 8)
    prep = PrepareConfig.from_args(worker_stage(spec, "prepare", paths))
    assert prep.sources() == [str(tmp_path / "regenerated.jsonl")] and prep.force  # replies changed: rebuilt
    off, _ = validate_spec(good(home), home)
    assert "regenerate" not in pipeline_stages(off)
    prep = PrepareConfig.from_args(worker_stage(off, "prepare", paths))
    assert prep.sources() == [str(home.data_root / "chats.jsonl")] and not prep.force


def test_form_offers_regeneration(home):
    at = form(home)
    assert not [w for w in at.text_input if w.key == "f_regenerate_max_tokens"]
    at.checkbox(key="f_regenerate").check().run()
    at.text_input(key="f_regenerate_max_tokens").set_value("32")
    at.button[0].click().run()
    with open_store(home.db_url)() as s:
        (run,) = runs.list_runs(s)
        assert [st.name for st in sorted(run.stages, key=lambda st: st.position)][0] == "regenerate"
    assert run.spec["regenerate"] is True and run.spec["regenerate_max_tokens"] == 32


def test_online_run_trains_on_the_layers_it_asked_for(home, tmp_path):
    spec, errors = validate_spec(good(home, mode="hybrid", gpus=1, layer_ids="1,4,8"), home)
    assert errors == {}
    paths = StagePaths(tmp_path)
    cfg = config_from_args(worker_stage(spec, "train", paths, verifier_url="http://v:8001"))
    assert cfg.vllm_layer_ids == [1, 4, 8] and cfg.prepared_data == str(tmp_path / "prepared")
    assert (cfg.vllm_endpoint, cfg.on_generate) == ("http://v:8001", "cache")


def test_demo_and_worker_run_the_demo_settings(tmp_path):
    """The demo's command lines (flags) and the worker's stage files (--config) for the same run
    settings, each read by the real CLI, against the values written out here."""
    from speculators.commands.demo import stage_commands

    args = argparse.Namespace(model=str(tmp_path / "v"), max_samples=32, seq_length=128, draft_vocab_size=64,
                              epochs=2, ttt_steps=3, lr=3e-3, eval_prompts=4)
    demo = dict(stage_commands(args, tmp_path))
    assert list(demo) == ["prepare", "vocab", "datagen", "train", "eval"]
    run = RunSettings(name="demo", model=str(tmp_path / "v"), dataset="sharegpt", seq_length=128, max_samples=32,
                      draft_vocab_size=64, epochs=2, lr=3e-3, ttt_steps=3, batch_size=8, total_seq_len=256)
    w, v = tmp_path, str(tmp_path / "v")
    expected = {
        "prepare": {"model": v, "data": "sharegpt", "output": f"{w}/prepared", "max_samples": 32,
                    "seq_length": 128, "seed": 0, "force": False},
        "vocab": {"token_freq_path": f"{w}/prepared/token_freq.pt", "draft_vocab_size": 64,
                  "target_model_path": v, "output_path": f"{w}/vocab"},
        "datagen": {"target_model_path": v, "train_data_path": f"{w}/prepared", "output_dir": f"{w}/hidden_states",
                    "batch_size": 8, "max_samples": 32, "layer_ids": None},
        "train": {"verifier_name_or_path": v, "data_path": f"{w}/hidden_states", "save_path": f"{w}/checkpoints",
                  "epochs": 2, "lr": 3e-3, "ttt_steps": 3, "num_layers": 1, "d2t_path": f"{w}/vocab/d2t.npy",
                  "t2d_path": f"{w}/vocab/t2d.npy", "draft_vocab_size": 64, "total_seq_len": 256, "seed": 0,
                  "run_name": "demo", "vllm_endpoint": None},
    }
    models = {"prepare": PrepareConfig, "vocab": VocabConfig, "datagen": DatagenConfig, "train": TrainConfig}
    for stage, want in expected.items():
        for how, parsed in (("demo", parse_args(build_parser(), demo[stage])),
                            ("worker", worker_stage(run, stage, StagePaths(tmp_path)))):
            cfg = models[stage].from_args(parsed)
            got = {k: getattr(cfg, k) for k in want}
            if stage in ("prepare", "datagen"):  # one source, given as a flag (a list) or in the file
                key = "data" if stage == "prepare" else "train_data_path"
                got[key] = cfg.sources()
                want = {**want, key: [want[key]] if isinstance(want[key], str) else want[key]}
            assert got == want, (how, stage)


def test_stored_records_of_older_versions_still_load(tmp_path):
    old = {"name": "-old", "model": "m", "dataset": "sharegpt", "seq_length": 64, "ttt_steps": 2,
           "batch_size": 4, "layer_ids": [2, 4], "removed_setting": 1}
    run = RunSettings.from_dict(old)
    assert (run.name, run.ttt_steps, run.layer_ids, run.regenerate) == ("-old", 2, [2, 4], False)
    cfg = parse_train(stage_args(run, "train", StagePaths(tmp_path)))
    assert cfg.run_name == "-old"  # passed as --run-name=-old: still one value


def test_every_stage_command_parses_with_the_real_cli(tmp_path):
    """Each stage's `--flag=value` arguments are what the real subcommands accept."""
    from speculators.cli import build_parser

    run = RunSettings.from_dict(dict(name="-dash", model="/m", dataset="sharegpt", layer_ids=[1, 3], max_samples=5,
                                     seq_length=128, draft_vocab_size=64, batch_size=2))  # an old record
    paths = StagePaths(tmp_path)
    parser = build_parser()
    prep = parser.parse_args(stage_args(run, "prepare", paths))
    vocab = parser.parse_args(stage_args(run, "vocab", paths))
    dg = parser.parse_args(stage_args(run, "datagen", paths))
    train = parser.parse_args(stage_args(run, "train", paths))
    seen = {k: v for ns in (prep, vocab, dg, train) for k, v in vars(ns).items() if not callable(v)}
    assert prep.seq_length == 128 and seen["draft_vocab_size"] == 64 and seen["run_name"] == "-dash"
    assert dg.seq_length is None and dg.train_data_path == [str(paths.prepared)]  # a prepared directory as is
    assert dg.layer_ids == [1, 3] and dg.batch_size == 2 and dg.output_dir == str(paths.hidden)
    assert vocab.output_path == str(paths.vocab) and prep.output == str(paths.prepared)


# --------------------------------------------------------------- prepare / vocab / datagen / regenerate
def stage_cli_default(command: str, dest: str):
    """The default `speculators <command>` parses for `dest` (the real parser)."""
    return vars(build_parser().parse_args([command, *REQUIRED[command]]))[dest]


def test_stage_settings_share_defaults_with_their_commands(home, tmp_path):
    """The form's initial values, the stored run, each subcommand's own defaults and the values
    the worker's stage commands carry all agree (batch_size was 4 in the form and 8 in datagen,
    regenerate_max_tokens 512 and 256)."""
    at = form(home)
    at.checkbox(key="f_regenerate").check().run()
    at.button[0].click().run()
    with open_store(home.db_url)() as s:
        (run,) = runs.list_runs(s)
    stored = RunSettings.from_dict(run.spec)
    paths = StagePaths(tmp_path)
    parsed = {command: vars(worker_stage(stored, stage, paths))
              for stage, command in (("prepare", "prepare-data"), ("vocab", "build-vocab-mapping"),
                                     ("datagen", "datagen"), ("regenerate", "regenerate"))}
    for run_name, (command, config, name) in STAGE_SHARED.items():
        if config.model_fields[name].is_required():  # the command has no default: the run has its own
            cli_default = None
        else:
            cli_default = stage_cli_default(command, name)
            assert cli_default == config.model_fields[name].get_default(), run_name
        expected = RUN_DEFAULTS.get(run_name, cli_default)
        assert RunSettings.model_fields[run_name].get_default() == expected, run_name
        if run_name == "draft_vocab_size":
            expected = 128  # form() sets it: the tiny verifier's vocabulary is 512
        assert getattr(stored, run_name) == expected, run_name
        if run_name in ("batch_size", "max_samples", "draft_vocab_size", "regenerate_backend",
                        "regenerate_max_tokens", "regenerate_temperature"):  # the fields the form shows
            value = widget_value(at, run_name)
            assert (type(expected)(value) if expected is not None else value) == expected, run_name
        assert parsed[command][name] == expected, run_name  # what the stage command runs with


@pytest.mark.parametrize("run_name,bad", [
    ("max_samples", 0), ("draft_vocab_size", 1), ("batch_size", 0), ("batch_size", 4097),
    ("regenerate_max_tokens", 0), ("regenerate_temperature", -0.5), ("regenerate_max_turns", 0),
    ("regenerate_concurrency", 0), ("regenerate_backend", "tgi"),
])
def test_stage_settings_refused_by_form_and_command_alike(home, tmp_path, capsys, run_name, bad):
    command, config, name = STAGE_SHARED[run_name]
    assert bounds_of(RunSettings.model_fields[run_name]) == bounds_of(config.model_fields[name])
    flag = "--" + name.replace("_", "-")
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in REQUIRED[command]]
    if flag in argv:  # replace the required value by the bad one
        argv[argv.index(flag) + 1] = str(bad)
    else:
        argv += [flag, str(bad)]
    with pytest.raises(SystemExit) if run_name == "regenerate_backend" else _noop():
        rc = cli_main([command, *argv])
        assert rc == 2
    err = capsys.readouterr().err
    assert flag in err
    spec, errors = validate_spec(good(home, **{run_name: bad}), home)
    assert spec is None and run_name in errors
    if run_name != "regenerate_backend":  # argparse refuses a choice itself; the schema's message otherwise
        assert f"{flag} {errors[run_name]}" in err  # the same message, from the same field
    assert not (tmp_path / "out").exists()


class _noop:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_one_edit_changes_cli_form_and_argv():
    """Change a stage setting's default and bound in its one place (the field of DatagenConfig
    and RegenConfig, replaced in a fresh interpreter before anything else is imported): the
    command's flag, the form's initial value, the run's validation and the stage command all
    follow."""
    import subprocess
    import sys

    probe = f"""
import sys
from pathlib import Path
from speculators.config.base import from_field
from speculators.config.datagen import DatagenConfig
from speculators.config.regenerate import RegenConfig
assert "speculators.config.run" not in sys.modules and "speculators.cli" not in sys.modules
DatagenConfig.model_fields["batch_size"] = from_field(DatagenConfig, "batch_size", default=5, le=64)
RegenConfig.model_fields["max_tokens"] = from_field(RegenConfig, "max_tokens", default=77)
from speculators.cli import build_parser
from speculators.config.run import RunSettings, form_defaults
from speculators.config.stages import StagePaths, stage_args
p = build_parser()
print(p.parse_args({["datagen", *REQUIRED["datagen"]]!r}).batch_size,
      p.parse_args({["regenerate", *REQUIRED["regenerate"]]!r}).max_tokens)
print(form_defaults(False)["batch_size"], form_defaults(False)["regenerate_max_tokens"])
run = RunSettings(name="r", model="m", dataset="sharegpt", regenerate=True)
print(next(a for a in stage_args(run, "datagen", StagePaths(Path("w"))) if a.startswith("--batch-size=")),
      stage_args(run, "regenerate", StagePaths(Path("w")))[5])
print(RunSettings.errors_of(dict(name="r", model="m", dataset="d", batch_size=65))[1]["batch_size"])
"""
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["5 77", "5 77", "--batch-size=5 --max-tokens=77",
                                       "must be a whole number between 1 and 64 (got 65)"]


# --------------------------------------------------------------- --config FILE, every command
def test_config_file_yaml_and_json_with_flags_overriding(tmp_path):
    """A settings file (YAML or JSON, field names with _ or -) gives a command its settings,
    required ones included; a flag on the command line wins over the file."""
    (tmp_path / "p.yaml").write_text("model: m\ndata: [a.jsonl, b.jsonl]\noutput: OUT\nseq-length: 64\n"
                                     "max_samples: 7\nrows: per-turn\ntrain_reasoning: false\n")
    (tmp_path / "p.json").write_text(json.dumps({"model": "m", "data": ["a.jsonl"], "output": "OUT",
                                                 "seq_length": 64, "max-samples": 7, "seed": 3}))
    for name in ("p.yaml", "p.json"):
        args = parse_args(build_parser(), ["prepare-data", "--config", str(tmp_path / name)])
        cfg = PrepareConfig.from_args(args)
        assert (cfg.model, cfg.output, cfg.seq_length, cfg.max_samples) == ("m", "OUT", 64, 7), name
    cfg = PrepareConfig.from_args(parse_args(build_parser(), ["prepare-data", "--config", str(tmp_path / "p.yaml")]))
    assert (cfg.sources(), cfg.rows, cfg.train_reasoning) == (["a.jsonl", "b.jsonl"], "per-turn", False)
    over = PrepareConfig.from_args(parse_args(build_parser(), [
        "prepare-data", "--max-samples", "9", "--data", "c.jsonl", "--config", str(tmp_path / "p.json")]))
    assert (over.max_samples, over.sources(), over.seed) == (9, ["c.jsonl"], 3)  # flags win, a list is replaced
    # a command whose flags are plain argparse options reads the same kind of file
    (tmp_path / "e.yaml").write_text("data: sharegpt\nnum_prompts: 5\ntemperature: 0\ndevice: cpu\n")
    ev = parse_args(build_parser(), ["eval", "--config", str(tmp_path / "e.yaml"), "--num-prompts", "6"])
    assert (ev.data, ev.num_prompts, ev.temperature, ev.device, ev.seed) == ("sharegpt", 6, 0.0, "cpu", 0)
    # python -m speculators.train (torchrun's entry) too
    (tmp_path / "t.json").write_text(json.dumps({"verifier_name_or_path": "m", "epochs": 3, "resume": False}))
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    add_config_option(p)
    cfg = config_from_args(parse_args(p, ["--config", str(tmp_path / "t.json"), "--lr", "0.5"]))
    assert (cfg.verifier_name_or_path, cfg.epochs, cfg.resume, cfg.lr) == ("m", 3, False, 0.5)


def test_every_command_accepts_config():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, command in sub.choices.items():
        assert "--config" in command.format_help(), name


@pytest.mark.parametrize("command,body,words", [
    ("prepare-data", {"seq_lenght": 64}, ["unknown setting(s) seq_lenght"]),
    ("prepare-data", {"seq_length": 1}, ["seq_length must be a whole number >= 2 (got 1)"]),
    ("train", {"ttt_steps": 40}, ["ttt_steps must be a whole number between 1 and 16 (got 40)"]),
    ("eval", {"num_prompts": "many"}, ["num_prompts", "many"]),
    ("eval", {"data_format_version": 5}, ["data_format_version", "choose one of 0, 1"]),
    ("serve", {"exit_when_ready": "yes"}, ["exit_when_ready must be true or false"]),
])
def test_config_file_errors_name_the_file_and_key(tmp_path, capsys, command, body, words):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(body))
    positional = {"serve": ["ck"]}.get(command, [])
    assert cli_main([command, *positional, "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"--config {path}" in err and all(w in err for w in words), err
    (tmp_path / "broken.yaml").write_text("a: [1,\n")
    assert cli_main([command, *positional, "--config", str(tmp_path / "broken.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_settings_file_round_trips_every_train_setting(tmp_path):
    """A TrainConfig written as the worker writes it, read by `speculators train --config`: the same config."""
    cfg = TrainConfig(
        verifier_name_or_path="m", data_path=str(tmp_path), epochs=3, lr=2.5e-4, ttt_steps=5, resume=False,
        norm_before_residual=False, vllm_layer_ids=[1, 3, 8], scheduler="linear", warmup_ratio=0.2,
        data_format_version=0, logger="tensorboard", run_name="-starts-with-dash", prefetch=3, vllm_timeout=9.5,
        freeze_lm_head=True,
    )
    path = write_settings_file(tmp_path / "settings" / "train.json", cfg)
    assert set(json.loads(path.read_text())) == cfg.model_fields_set
    assert parse_train(["train", "--config", str(path)]) == cfg


def test_help_and_version_print_once_and_unchanged(capsys):
    """Reading the command line for --config must not act on it: --help prints the command's
    usage once, with its required flags still required; --version prints once."""
    with pytest.raises(SystemExit):
        cli_main(["prepare-data", "--help"])
    out = capsys.readouterr().out
    assert out.count("usage:") == 1 and "--model MODEL --data DATA" in out and "[--model" not in out
    with pytest.raises(SystemExit):
        cli_main(["--version"])
    assert capsys.readouterr().out.count("EAGLE-3 trainer + dashboard project") == 1


# --------------------------------------------------------------- acceptance settings (issue 23)
def test_form_sets_the_acceptance_flags_the_trainer_runs_with(home, tmp_path):
    """The form's "Acceptance and checkpoints" fields reach `speculators train` as its
    --eval-* / --best-by / --checkpoint-every-steps flags (the real parser reads the worker's settings file)."""
    held = home.data_root / "heldout.jsonl"
    held.write_text('{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}\n')
    at = form(home)
    at.text_input(key="f_eval_every_steps").set_value("25")
    at.text_input(key="f_eval_prompts").set_value("4")
    at.text_input(key="f_eval_max_tokens").set_value("16")
    at.text_input(key="f_eval_data").set_value("heldout.jsonl")
    at.radio(key="f_best_by").set_value("acceptance")
    at.text_input(key="f_checkpoint_every_steps").set_value("50")
    at.button[0].click().run()
    assert not at.exception and not at.session_state["form_errors"]
    with open_store(home.db_url)() as s:
        (run,) = runs.list_runs(s)
    stored = RunSettings.from_dict(run.spec)
    cfg = config_from_args(worker_stage(stored, "train", StagePaths(tmp_path / "w")))
    assert (cfg.eval_every_steps, cfg.eval_prompts, cfg.eval_max_tokens, cfg.best_by, cfg.checkpoint_every_steps) \
        == (25, 4, 16, "acceptance", 50)
    assert cfg.eval_data == str(held.resolve())
    # left empty: the training data's validation rows (no --eval-data)
    default = config_from_args(worker_stage(RunSettings.from_dict({**run.spec, "eval_data": ""}), "train",
                                            StagePaths(tmp_path / "w2")))
    assert default.eval_data is None


def test_form_sets_the_training_options_the_stages_run_with(home, tmp_path):
    """The form's Advanced choices (draft algorithm, optimizer, loss, gradient checkpointing, hidden-state
    storage) reach `speculators train` and `speculators datagen` through their real parsers."""
    at = form(home)
    at.radio(key="f_optimizer").set_value("muon")
    at.radio(key="f_loss").set_value("lk")
    at.checkbox(key="f_gradient_checkpointing").check()
    at.checkbox(key="f_freeze_lm_head").check()
    at.radio(key="f_hidden_states_dtype").set_value("fp8")
    at.button[0].click().run()
    assert not at.exception and not at.session_state["form_errors"]
    with open_store(home.db_url)() as s:
        (run,) = runs.list_runs(s)
    stored = RunSettings.from_dict(run.spec)
    paths = StagePaths(tmp_path / "w")
    cfg = config_from_args(worker_stage(stored, "train", paths))
    assert (cfg.algorithm, cfg.optimizer, cfg.loss, cfg.gradient_checkpointing, cfg.freeze_lm_head) == \
        ("eagle3", "muon", "lk", True, True)
    assert DatagenConfig.from_args(worker_stage(stored, "datagen", paths)).hidden_states_dtype == "fp8"
    # a DFlash run refuses the EAGLE-3-only options on the form, with the trainer's own message
    spec, errors = validate_spec(good(home, algorithm="dflash", loss="lk"), home)
    assert spec is None and "loss" in " ".join(errors.values())


@pytest.mark.parametrize("value,message", [("../../etc/passwd", "inside the data root"),
                                           ("missing.jsonl", "no such file or directory")])
def test_eval_data_outside_or_missing_is_refused_at_the_form(home, value, message):
    at = form(home)
    at.text_input(key="f_eval_data").set_value(value)
    at.button[0].click().run()
    assert message in at.session_state["form_errors"].get("eval_data", "")
    with open_store(home.db_url)() as s:
        assert runs.list_runs(s) == []


def test_acceptance_bounds_refused_by_form_and_cli_alike(home):
    with pytest.raises(UserError, match="--eval-prompts") as cli_err:
        parse_train(["train", "--verifier-name-or-path", "m", "--eval-prompts=5000"])
    spec, errors = validate_spec(good(home, eval_prompts=5000), home)
    assert spec is None and errors["eval_prompts"] in str(cli_err.value)

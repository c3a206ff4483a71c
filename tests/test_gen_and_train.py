"""`speculators gen-and-train`: the whole pipeline from one command, resumable stage by stage.

Runs the real command in a subprocess with the tiny Llama verifier and a small local jsonl:
a run killed (its whole process group, SIGKILL) during train finishes on a rerun without
redoing the finished stages (shown by their records and by the inode and mtime of their
files) and train resumes from its checkpoint; a changed draft vocab size redoes vocab, train
and eval but not prepare or datagen, and the superseded outputs are kept; a failing stage stops
the pipeline naming the stage and its log; --dry-run prints the commands and writes nothing.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from speculators.cli import build_parser
from speculators.commands.stage_runner import Stage, move_aside, normalized, plan

REPO = Path(__file__).resolve().parents[1]
TOPICS = ["cats", "rivers", "bread", "trains", "stars", "gardens", "music", "rain", "maps", "tea"]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "speculators", "gen-and-train", *args]


def _write_chats(path: Path, n: int = 40) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            t = TOPICS[i % len(TOPICS)]
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"Tell me something about {t}, please ({i})."},
                {"role": "assistant", "content": f"Here is a short note about {t}: {t} are common, and people "
                                                 f"talk about {t} often. Number {i} is a fine number."}]}) + "\n")
    return path


def _flags(model: Path, data: Path, work: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--work-dir", str(work), "--max-samples", "24",
            "--seq-length", "64", "--draft-vocab-size", "64", "--epochs", "6", "--lr", "3e-3",
            "--batch-size", "8", "--checkpoint-every-steps", "2", "--eval-prompts", "2", *extra]


def _record(work: Path) -> dict:
    return json.loads((work / "pipeline.json").read_text())["stages"]


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def _files(work: Path) -> dict[str, Path]:
    """One output file of each early stage."""
    return {"prepare": work / "prepared" / "token_freq.pt", "vocab": work / "vocab" / "d2t.npy",
            "datagen": work / "hidden_states" / "data_0.pt"}


@pytest.fixture(scope="module")
def killed_then_resumed(tiny_llama, tmp_path_factory):
    """A run killed during train, then the same command again; returns what the test checks."""
    root = tmp_path_factory.mktemp("gen_and_train")
    data = _write_chats(root / "chats.jsonl")
    work = root / "work"
    flags = _flags(tiny_llama, data, work)
    first = subprocess.Popen(_cmd(*flags), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
    deadline = time.time() + 600
    try:
        # kill the whole process group (gen-and-train and its trainer) once train saved a checkpoint
        while not (work / "checkpoints" / "checkpoint_latest").exists():
            assert first.poll() is None, first.stdout.read().decode()
            assert time.time() < deadline, "train saved no checkpoint in time"
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)
    finally:
        first.wait()
        out_first = first.stdout.read().decode()
    before = _record(work)
    assert before["train"]["status"] == "running", out_first  # killed, not finished
    stats = {k: _stat(p) for k, p in _files(work).items()}
    second = subprocess.run(_cmd(*flags), env=_env(), capture_output=True, text=True, timeout=900)
    return dict(root=root, data=data, work=work, flags=flags, before=before, stats=stats, second=second)


@pytest.mark.slow
def test_killed_run_continues_without_redoing_finished_stages(killed_then_resumed):
    r = killed_then_resumed
    second, work = r["second"], r["work"]
    assert second.returncode == 0, second.stdout + second.stderr
    after = _record(work)
    for stage in ("prepare", "vocab", "datagen"):
        assert r["before"][stage]["status"] == "done"
        assert after[stage] == r["before"][stage], stage  # same record: not run again
        assert _stat(_files(work)[stage]) == r["stats"][stage], stage  # same file, untouched
        assert f"== {stage}: done at" in second.stdout
    assert after["train"]["status"] == after["eval"]["status"] == "done"
    assert after["train"]["started_at"] > r["before"]["train"]["started_at"]
    assert "== train: started at" in second.stdout and "rerunning it in place" in second.stdout
    # the trainer resumed from the checkpoint the killed run saved, in the same directory
    starts = [json.loads(x) for x in (work / "checkpoints" / "metrics.jsonl").read_text().splitlines()
              if '"start"' in x]
    assert starts[-1]["resumed_from"] is not None, starts
    assert not (work / "superseded").exists()
    # a full run to a checkpoint and an eval report
    assert (work / "checkpoints" / "checkpoint_best" / "model.safetensors").is_file()
    report = json.loads((work / "eval.json").read_text())
    assert report["mean_acceptance_length"] >= 1.0
    assert f"best checkpoint: {work / 'checkpoints' / 'checkpoint_best'}" in second.stdout
    # each stage's output is in its log too, after a header naming the command
    train_log = (work / "logs" / "train.log").read_text()
    assert train_log.count("\n=== ") == 2 and "-m speculators train --verifier-name-or-path=" in train_log
    assert "mean acceptance length" in (work / "logs" / "eval.log").read_text()

    # the same command once more runs nothing
    third = subprocess.run(_cmd(*r["flags"]), env=_env(), capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr
    assert _record(work) == after
    assert "stages run now: none" in third.stdout


@pytest.mark.slow
def test_changed_vocab_size_redoes_vocab_and_what_reads_it(killed_then_resumed):
    r = killed_then_resumed
    assert r["second"].returncode == 0
    # a copy of the finished work directory (its records name paths relative to it)
    work = r["root"] / "moved"
    shutil.copytree(r["work"], work, symlinks=True)
    before = _record(work)
    stats = {k: _stat(p) for k, p in _files(work).items()}
    flags = _flags(Path(r["flags"][1]), r["data"], work)
    flags[flags.index("--draft-vocab-size") + 1] = "32"
    proc = subprocess.run(_cmd(*flags), env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    after = _record(work)
    for stage in ("prepare", "datagen"):
        assert after[stage] == before[stage] and _stat(_files(work)[stage]) == stats[stage]
    for stage in ("vocab", "train", "eval"):
        assert after[stage]["started_at"] > before[stage]["finished_at"], stage
        assert after[stage]["status"] == "done"
    assert "== vocab: settings changed: --draft-vocab-size 64 -> 32" in proc.stdout
    assert "== eval: its input train changed" in proc.stdout
    import numpy as np

    assert np.load(work / "vocab" / "d2t.npy").shape == (32,)
    cfg = json.loads((work / "checkpoints" / "checkpoint_best" / "config.json").read_text())
    assert cfg["draft_vocab_size"] == 32
    # the old outputs were moved aside, not deleted
    moved = {p.name: p for p in (work / "superseded").iterdir()}
    vocab_dir = next(p for n, p in moved.items() if n.endswith("-vocab"))
    assert np.load(vocab_dir / "vocab" / "d2t.npy").shape == (64,)
    train_dir = next(p for n, p in moved.items() if n.endswith("-train"))
    assert (train_dir / "checkpoints" / "checkpoint_best" / "model.safetensors").is_file()


@pytest.mark.slow
def test_failing_stage_stops_the_pipeline_naming_it_and_its_log(tiny_llama, tmp_path):
    work = tmp_path / "w"
    proc = subprocess.run(_cmd("--model", str(tiny_llama), "--data", str(tmp_path / "missing.jsonl"),
                               "--work-dir", str(work), "--max-samples", "4", "--seq-length", "64"),
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    log = work / "logs" / "prepare.log"
    assert f"gen-and-train stopped: stage 'prepare' failed (exit {proc.returncode}); its log: {log}" in proc.stderr
    assert "missing.jsonl" in log.read_text()  # the stage's own error is in its log
    rec = _record(work)
    assert rec["prepare"]["status"] == "failed" and set(rec) == {"prepare"}


def _parsed(line: str) -> tuple[str, dict]:
    """A printed command as the real parser reads it: (subcommand, values)."""
    argv = shlex.split(line)
    assert argv[:3] == [sys.executable, "-m", "speculators"] or argv[1:3] == ["-m", "torch.distributed.run"]
    if argv[1:3] == ["-m", "torch.distributed.run"]:
        i = argv.index("speculators.train")
        args = ["train", *argv[i + 1:]]
    else:
        args = argv[3:]
    values = {k: v for k, v in vars(build_parser().parse_args(args)).items() if not callable(v)}
    return args[0], values


@pytest.mark.parametrize("spelling", ["gen-and-train", "gen_and_train"])
def test_dry_run_prints_the_commands_and_writes_nothing(tmp_path, spelling):
    work = tmp_path / "w"
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: org/verifier\ndata: sharegpt\nmax-samples: 100\ndraft_vocab_size: 500\n"
                   "epochs: 3\nregenerate: true\nnproc_per_node: 2\n")
    proc = subprocess.run([sys.executable, "-m", "speculators", spelling, "--config", str(cfg), "--dry-run",
                           "--work-dir", str(work), "--epochs", "5", "--datagen-backend", "vllm"],
                          env=_env(), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not work.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]
    lines = proc.stdout.strip().splitlines()
    got = dict(_parsed(line) for line in lines)
    assert list(got) == ["regenerate", "prepare-data", "build-vocab-mapping", "datagen", "train", "eval"]
    assert lines[4].split()[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    regen, prep, vocab, gen, train, ev = got.values()
    assert regen["model"] == "org/verifier" and regen["data"] == ["sharegpt"] and regen["max_samples"] == 100
    assert prep["data"] == [str(work / "regenerated.jsonl")] and prep["output"] == str(work / "prepared")
    assert (vocab["draft_vocab_size"], vocab["token_freq_path"]) == (500, str(work / "prepared" / "token_freq.pt"))
    assert (gen["backend"], gen["train_data_path"], gen["output_dir"]) == (
        "vllm", [str(work / "prepared")], str(work / "hidden_states"))  # repeatable, as prepare-data's --data
    assert train["epochs"] == 5  # the flag wins over the file's 3
    assert (train["data_path"], train["save_path"]) == (str(work / "hidden_states"), str(work / "checkpoints"))
    assert (train["d2t_path"], train["draft_vocab_size"]) == (str(work / "vocab" / "d2t.npy"), 500)
    assert ev["checkpoint"] == str(work / "checkpoints" / "checkpoint_best") and ev["skip_samples"] == 100
    assert "# train: would run (not run yet)" in proc.stderr


def test_bad_settings_name_the_flag_or_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": "m", "data": "sharegpt", "draft_vocab": 3}))
    proc = subprocess.run(_cmd("--config", str(bad), "--dry-run"), env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "unknown setting(s) draft_vocab" in proc.stderr and str(bad) in proc.stderr
    proc = subprocess.run(_cmd("--data", "sharegpt", "--dry-run"), env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "--model required" in proc.stderr
    proc = subprocess.run(_cmd("--model", "m", "--data", "d", "--nproc-per-node", "0", "--dry-run"), env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--nproc-per-node" in proc.stderr


# ------------------------------------------------------------------ the plan, without processes

def _stages(work: Path, vocab_size: str = "64") -> list[Stage]:
    def st(name, args, inputs, out):
        return Stage(name, args, ["py", "-m", "speculators", *args], inputs, [work / out])

    return [st("prepare", ["prepare-data", f"--output={work}/prepared"], (), "prepared"),
            st("vocab", ["build-vocab-mapping", f"--draft-vocab-size={vocab_size}"], ("prepare",), "vocab"),
            st("datagen", ["datagen", f"--output-dir={work}/hs"], ("prepare",), "hs"),
            st("train", ["train", "--epochs=2"], ("vocab", "datagen"), "ck")]


def _done(stages: list[Stage], work: Path) -> dict:
    from speculators.commands.stage_runner import fingerprints

    fps = fingerprints(stages, work)
    return {"stages": {s.name: {"status": "done", "fingerprint": fps[s.name], "args": normalized(s.args, work),
                                "inputs": {u: fps[u] for u in s.inputs if u in fps}} for s in stages}}


def test_plan_follows_what_each_stage_reads(tmp_path):
    work = tmp_path
    record = _done(_stages(work), work)
    assert [s.action for s in plan(_stages(work), record, work)] == ["skip"] * 4
    # the draft vocab size feeds vocab, and train reads vocab: datagen is kept
    steps = plan(_stages(work, "32"), record, work)
    assert [s.action for s in steps] == ["skip", "run", "skip", "run"]
    assert steps[1].reason == "settings changed: --draft-vocab-size 64 -> 32"
    assert steps[3].reason == "its input vocab changed"
    # the same records read from another place: the work directory is written {work}
    other = tmp_path / "elsewhere"
    assert [s.action for s in plan(_stages(other), record, other)] == ["skip"] * 4
    # a stage that started but did not finish reruns in place; outputs no record explains are moved aside
    record["stages"]["train"]["status"] = "running"
    (work / "ck").mkdir()
    assert plan(_stages(work), record, work)[3].action == "resume"
    del record["stages"]["train"]
    assert plan(_stages(work), record, work)[3].action == "redo"


def test_move_aside_keeps_everything(tmp_path):
    (tmp_path / "vocab").mkdir()
    (tmp_path / "vocab" / "d2t.npy").write_bytes(b"old")
    (tmp_path / "eval.json").write_text("{}")
    dest = move_aside([tmp_path / "vocab", tmp_path / "eval.json", tmp_path / "absent"], tmp_path, "vocab")
    assert (dest / "vocab" / "d2t.npy").read_bytes() == b"old" and (dest / "eval.json").read_text() == "{}"
    assert not (tmp_path / "vocab").exists()
    assert move_aside([tmp_path / "vocab"], tmp_path, "vocab") is None
    (tmp_path / "vocab").mkdir()
    assert move_aside([tmp_path / "vocab"], tmp_path, "vocab") != dest  # a second move in the same second


def test_runner_streams_records_and_passes_sigterm_on(tmp_path, capfd):
    """The runner with stand-in stages (plain Python processes): output on the console and in
    the stage's log, a record per stage, and a SIGTERM sent to the runner reaches the stage."""
    import threading

    from speculators.commands.stage_runner import StageFailed, run_stages

    ready = tmp_path / "ready"
    child = ("import signal, sys, time, pathlib\n"
             "def stop(*_):\n    print('stage got SIGTERM', flush=True); sys.exit(143)\n"
             "signal.signal(signal.SIGTERM, stop)\n"
             f"pathlib.Path({str(ready)!r}).touch(); print('working', flush=True); time.sleep(30)\n")
    stages = [Stage("one", ["one"], [sys.executable, "-c", "print('first stage output')"]),
              Stage("two", ["two"], [sys.executable, "-c", child], ("one",))]

    def terminate_when_ready():
        while not ready.exists():
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    waiter = threading.Thread(target=terminate_when_ready, daemon=True)
    waiter.start()
    with pytest.raises(StageFailed) as failed:
        run_stages(stages, tmp_path, log_of=lambda s: tmp_path / "logs" / f"{s}.log")
    waiter.join(5)
    assert (failed.value.stage, failed.value.code) == ("two", 143) and "was interrupted" in str(failed.value)
    out = capfd.readouterr().out
    assert "first stage output" in out and "stage got SIGTERM" in out
    assert "first stage output" in (tmp_path / "logs" / "one.log").read_text()
    assert "stage got SIGTERM" in (tmp_path / "logs" / "two.log").read_text()
    rec = _record(tmp_path)
    assert (rec["one"]["status"], rec["two"]["status"], rec["two"]["exit_code"]) == ("done", "failed", 143)
    # the runner's own SIGTERM handling is back to what it was
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_stage_extras_are_the_commands_settings_and_never_the_runs(tmp_path):
    from speculators.config.gen_and_train import GenTrainConfig
    from speculators.config.stages import StagePaths, stage_args
    from speculators.errors import UserError

    cfg = GenTrainConfig(model="m", data="sharegpt", work_dir=str(tmp_path), datagen_backend="vllm",
                         tensor_parallel_size=2, logger="tensorboard")
    assert cfg.stage_extra("datagen") == {"backend": "vllm", "tensor_parallel_size": 2}  # defaults left out
    assert cfg.stage_extra("train") == {"logger": "tensorboard"} and cfg.stage_extra("vocab") == {}
    run, paths = cfg.run_settings(), StagePaths(tmp_path)
    assert "--tensor-parallel-size=2" in stage_args(run, "datagen", paths, extra=cfg.stage_extra("datagen"))
    with pytest.raises(UserError, match="train: lr is set from the pipeline's own settings"):
        stage_args(run, "train", paths, extra={"lr": 0.5})
    with pytest.raises(UserError, match="--tensor-parallel-size"):
        stage_args(run, "datagen", paths, extra={"tensor_parallel_size": 0})

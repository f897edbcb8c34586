"""A tiny byte-level model saved to disk and real ``ssmkit serve`` processes on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from ssmkit.data.tokenizer import ByteTokenizer
from ssmkit.models import LanguageModel, get_preset
from ssmkit.models.presets import BYTE_BOS, BYTE_EOS, BYTE_VOCAB_SIZE

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def tiny_model() -> LanguageModel:
    """debug-mamba2 with the byte vocabulary; larger Δ biases so the state remembers (as in test_generate)."""
    config = get_preset("debug-mamba2")
    config.vocab_size = BYTE_VOCAB_SIZE
    torch.manual_seed(0)
    model = LanguageModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("dt_bias"):
                p.add_(2.0)
    return model.eval()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("serve") / "tiny-bytes"
    tiny_model().save_pretrained(folder)
    ByteTokenizer().save(folder)
    return folder


@pytest.fixture(scope="session")
def reference(model_dir):
    """The served model loaded in the test process, and ``generate`` on a text as the server reads it."""
    from ssmkit.generation import generate

    model = LanguageModel.from_pretrained(model_dir).eval()

    def run(text: str | list[int], max_tokens: int, **sampling) -> list[int]:
        """New tokens for ``text`` (read after the start token, as the server does) or for a list of ids."""
        ids = [BYTE_BOS] + list(text.encode()) if isinstance(text, str) else text
        return generate(model, [ids], max_tokens, eos_token_id=BYTE_EOS, **sampling)[0]

    return run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m ssmkit serve`` in a child process, with its log in a file."""

    def __init__(self, model_dir: Path, sessions_dir: Path, log: Path, *args: str) -> None:
        self.argv = [sys.executable, "-m", "ssmkit", "serve", "--checkpoint", str(model_dir),
                     "--sessions-dir", str(sessions_dir), *args]
        self.log = log
        self.sessions_dir = sessions_dir
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 60.0) -> None:
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen([*self.argv, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                         env=env, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop(kill=True)
        raise RuntimeError(f"server did not start in {timeout} s:\n{self.log.read_text()}")

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def client(self, auth: bool = True) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=AUTH if auth else {}, timeout=30)


@pytest.fixture(scope="session")
def server(model_dir, tmp_path_factory):
    """One server for most tests: token auth, small limits, and a session memory budget of ~3 states."""
    folder = tmp_path_factory.mktemp("server")
    (folder / "token").write_text(TOKEN + "\n")
    state_mb = tiny_model().cache_nbytes(1) / 2**20
    proc = ServerProcess(model_dir, folder / "sessions", folder / "server.log", "--token-file", str(folder / "token"),
                         "--max-body-mb", str(16 / 1024), "--max-prompt-tokens", "4000", "--max-tokens-cap", "200",
                         "--session-memory-mb", str(3.5 * state_mb), "--prefix-cache-interval", "512")
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c


def state_file_mb() -> float:
    """Megabytes one session takes on disk (its state and the quota's allowance for header and record)."""
    return (tiny_model().cache_nbytes(1) + 64 * 1024) / 2**20


@pytest.fixture(scope="module")
def open_server(model_dir, tmp_path_factory):
    """A server as most people run it (loopback, no token, default body limit), with short connection timeouts,
    one extra allowed Host name and a session disk quota of three and a half sessions."""
    folder = tmp_path_factory.mktemp("open-server")
    proc = ServerProcess(model_dir, folder / "sessions", folder / "server.log", "--max-tokens-cap", "400",
                         "--header-timeout", "3", "--body-timeout", "2", "--max-idle-connections", "64",
                         "--allowed-hosts", "api.example", "--session-disk-mb", str(3.5 * state_file_mb()))
    proc.start()
    yield proc
    proc.stop()


CHATML = ("{% for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}"
          "{{ raise_exception('unknown role ' + m.role) }}{% endif %}"
          "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="session")
def token_model_dir(tmp_path_factory) -> Path:
    """A tiny subword model as transformers saves one: its own tokenizer.json (BPE with ChatML specials, no
    ssmkit specials) and a chat template in tokenizer_config.json."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("serve") / "tiny-chat"
    folder.mkdir()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the state of a model is a fixed size; read a document once and ask it questions"] * 20,
                            trainer)
    from tokenizers import decoders
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "<|im_end|>"}))
    config = get_preset("debug-mamba2")
    config.vocab_size = tok.get_vocab_size()
    torch.manual_seed(1)
    model = LanguageModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("dt_bias"):
                p.add_(2.0)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def chat_server(token_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat-server")
    proc = ServerProcess(token_model_dir, folder / "sessions", folder / "server.log", "--max-tokens-cap", "64",
                         "--prefix-cache-interval", "32")
    proc.start()
    yield proc
    proc.stop()


def assert_cli_refuses(argv: list[str], needle: str, capsys) -> None:
    """``ssmkit argv`` is refused: by an option's range (argparse usage error, exit 2, naming the flag) or by
    the options' own check (exit 1, its message containing ``needle``)."""
    from ssmkit.cli import main

    flag = next((a for a in argv if a.startswith("--") and a != "--checkpoint"), needle)
    try:
        code, expected = main(argv), needle
    except SystemExit as e:
        code, expected = e.code, flag
    assert code in (1, 2), argv
    assert expected in capsys.readouterr().err, argv

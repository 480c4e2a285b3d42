"""Safe loading and no surprise network traffic."""

import re
import socket
from pathlib import Path

import yaml
from conftest import adapter_recipe

from finetune.cli import main

PACKAGE = Path(__file__).resolve().parents[1] / "finetune"
COLUMNS = {"query": "question", "positive": "answer", "id": "id", "domain": "category"}


def test_no_unsafe_deserialisation_in_the_package():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert not re.search(r"\bimport pickle\b|\bpickle\.loads?\(|\bdill\b", text), path
        assert not re.search(r"yaml\.load\(|yaml\.unsafe_load|yaml\.full_load", text), path
        assert "trust_remote_code=True" not in text, path


def test_trust_remote_code_is_off_unless_the_recipe_asks(tmp_path, pairs_file):
    from finetune.recipe import validate_recipe

    raw = adapter_recipe({"path": str(pairs_file)}, tmp_path, tmp_path)
    assert validate_recipe(raw).model.trust_remote_code is False


def test_a_local_recipe_opens_no_network_connection(tmp_path, tiny_model, pairs_file, monkeypatch):
    attempts = []
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "localhost", "::1") and not str(host).startswith("/"):
            attempts.append(address)
            raise OSError(f"network access to {address} in a local run")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # even with the Hub not marked offline
    raw = adapter_recipe({"path": str(pairs_file), "columns": COLUMNS}, tiny_model, tmp_path)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path)]) == 0
    assert attempts == []

"""Small trained layers on disk: ``<stem>.safetensors`` plus ``<stem>_config.json``, never pickle.

Loading rebuilds the layer from its config and checks every tensor's shape before loading, so a
file from another model gives one clear error instead of a size mismatch deep inside torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from torch import nn

from finetune.atomic import save_tensors, write_json
from finetune.errors import FinetuneError


def save_layer(module: nn.Module, folder: str | Path, stem: str, config: dict) -> None:
    """Write ``<stem>.safetensors`` and ``<stem>_config.json`` into ``folder`` (atomically)."""
    folder = Path(folder)
    save_tensors(folder / f"{stem}.safetensors", module.state_dict())
    write_json(folder / f"{stem}_config.json", config)


def load_layer(folder: str | Path, stem: str, build: Callable[[dict], nn.Module], hint: str) -> nn.Module:
    """Rebuild a layer saved by :func:`save_layer` with ``build(config)`` and load its checked weights.

    Args:
        folder: The folder holding the two files.
        stem: ``adapter``, ``projection``, ...
        build: Makes an untrained layer of the right shape from the saved config.
        hint: The fix to print when a file is missing.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path, weights_path = folder / f"{stem}_config.json", folder / f"{stem}.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FinetuneError(f"missing; {hint}", where=str(path))
    config = json.loads(config_path.read_text())
    module = build(config)
    state = load_file(str(weights_path))
    for name, tensor in module.state_dict().items():
        got = state.get(name)
        if got is None or got.shape != tensor.shape:
            shape = "missing" if got is None else tuple(got.shape)
            raise FinetuneError(
                f"tensor '{name}' is {shape}, expected {tuple(tensor.shape)} for {config}", where=str(weights_path)
            )
    module.load_state_dict(state)
    return module

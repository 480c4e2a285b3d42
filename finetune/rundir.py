"""Run directories: ``runs/<name>-<timestamp>/`` with the resolved recipe, splits, versions and metrics."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path

from finetune.atomic import write_json, write_text

PACKAGES = ("finetune", "torch", "transformers", "sentence-transformers", "peft", "bitsandbytes", "unsloth", "datasets", "numpy")


def new_run_dir(root: str | Path, name: str) -> Path:
    """Create and return a fresh ``<root>/<name>-<YYYYmmdd-HHMMSS>`` folder (a suffix avoids clashes)."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{name}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    path.mkdir(parents=True)
    return path


def versions() -> dict[str, str]:
    """Python, platform, the installed versions of the libraries that shape results, and the git commit."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        import torch

        out["cuda"] = torch.version.cuda or "none"
        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        here = Path(__file__).resolve().parent
        out["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def write_run_header(run_dir: Path, recipe_yaml: str, splits, command: str) -> None:
    """The files every run directory has from its start: recipe, splits, versions, command."""
    write_text(run_dir / "recipe.yaml", recipe_yaml)
    splits.save(run_dir / "splits.json")
    write_json(run_dir / "versions.json", versions())
    write_text(run_dir / "command.txt", command + "\n")

"""Run directories: ``runs/<name>-<timestamp>/`` with the resolved recipe, splits, versions and metrics."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path

from finetune.atomic import write_json, write_text

PACKAGES = (
    "finetune",
    "torch",
    "transformers",
    "sentence-transformers",
    "peft",
    "bitsandbytes",
    "unsloth",
    "datasets",
    "numpy",
)


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


def prepare_run_dir(
    root: str | Path,
    name: str,
    recipe_yaml: str,
    run_dir: str | None = None,
    resume: str | None = None,
    overwrite: bool = False,
) -> tuple[Path, bool]:
    """The run directory to write to, and whether it continues an earlier run.

    Args:
        root, name: New runs go to ``<root>/<name>-<timestamp>``.
        recipe_yaml: The resolved recipe; a resumed run must have been made by the same one.
        run_dir: An exact folder for a new run; an existing non-empty one needs ``overwrite``.
        resume: ``"latest"`` (the newest unfinished ``<root>/<name>-*``) or a run directory.
        overwrite: Replace ``run_dir`` if it exists.

    Returns:
        ``(path, resuming)``. Nothing is created or deleted here; see :func:`claim_run_dir`.
    """
    import yaml

    from finetune.errors import FinetuneError

    if resume is not None:
        path = _latest_unfinished(Path(root), name) if resume == "latest" else Path(resume)
        if not (path / "recipe.yaml").is_file():
            raise FinetuneError(
                "not a run directory (no recipe.yaml); pass the folder of the run to resume", where=str(path)
            )
        if (path / "metrics.json").is_file():
            raise FinetuneError(
                "this run has finished; nothing to resume (start a new run without --resume)", where=str(path)
            )
        saved, now = yaml.safe_load((path / "recipe.yaml").read_text(encoding="utf-8")), yaml.safe_load(recipe_yaml)
        diff = _first_difference(saved, now)
        if diff:
            key, was, is_ = diff
            raise FinetuneError(
                f"the recipe differs from the run's at {key} ({was!r} there, {is_!r} now); resume with the same "
                "recipe and overrides",
                where=str(path / "recipe.yaml"),
            )
        return path, True
    if run_dir:
        path = Path(run_dir)
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise FinetuneError(
                "already exists; pass --overwrite to replace it, or --resume to continue it", where=str(path)
            )
        return path, False
    return Path(root) / f"{name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}", False


def claim_run_dir(path: Path, resuming: bool, overwrite: bool) -> Path:
    """Create ``path`` (replacing it when ``overwrite``); a timestamped name that exists gets a suffix."""
    import shutil

    if resuming:
        return path
    if path.exists() and overwrite:
        shutil.rmtree(path)
    base, n = path, 1
    while path.exists() and any(path.iterdir()):
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _latest_unfinished(root: Path, name: str) -> Path:
    from finetune.errors import FinetuneError

    candidates = sorted(
        (p for p in root.glob(f"{name}-*") if (p / "recipe.yaml").is_file() and not (p / "metrics.json").is_file()),
        key=lambda p: p.stat().st_mtime,
    )
    if not candidates:
        raise FinetuneError(
            f"no unfinished run named '{name}-*' to resume; pass its folder: --resume RUN_DIR", where=str(root)
        )
    return candidates[-1]


def _first_difference(a, b, prefix: str = ""):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            found = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if a == b else (prefix.rstrip("."), a, b)

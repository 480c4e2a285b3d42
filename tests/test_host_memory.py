"""Freed activation buffers go back to the system (glibc's mmap threshold fixed by finetune.memory.host)."""

import os
import subprocess
import sys

import pytest

# 64 blocks of 4 MiB freed while the last stays: after a 30 MiB block raised glibc's dynamic threshold,
# they come from the heap, and with the default allocator none of the freed ones leaves the process
PROGRAM = """
import torch
from pathlib import Path
from finetune.memory.host import return_freed_memory
applied = return_freed_memory()
def rss():
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20
big = torch.ones(30 * 2**18); del big
blocks = [torch.ones(4 * 2**18) for _ in range(64)]
keep = blocks[-1]
before = rss()
del blocks
print(applied, before - rss())
"""


def _freed(**env) -> tuple[bool, float]:
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM], env={**os.environ, **env}, capture_output=True, text=True, check=True
    )
    applied, freed = out.stdout.split()
    return applied == "True", float(freed)


@pytest.mark.skipif(
    not hasattr(os, "confstr") or "glibc" not in (os.confstr("CS_GNU_LIBC_VERSION") or "").lower(),
    reason="glibc only",
)
def test_freed_blocks_leave_the_process_unless_glibc_s_default_is_asked_for():
    applied, freed = _freed()
    assert applied and freed > 200  # 63 blocks of 4 MiB given back
    applied, freed = _freed(FINETUNE_GLIBC_MALLOC="default")
    assert not applied and freed < 20
    applied, _ = _freed(MALLOC_MMAP_THRESHOLD_="131072")  # the user's own setting is left alone
    assert not applied


def test_a_run_fixes_the_threshold_first(monkeypatch, tmp_path):
    """run_recipe sets it before anything else (so the first step's buffers already go back)."""
    import finetune.run as run

    calls = []
    monkeypatch.setattr(run, "return_freed_memory", lambda: calls.append("set") or True)
    monkeypatch.setattr(run, "seed_everything", lambda seed: calls.append("seed"))
    monkeypatch.setattr(run, "prepare_run_dir", lambda *a: (_ for _ in ()).throw(RuntimeError("stop here")))
    from finetune.recipe import validate_recipe

    recipe = validate_recipe({"kind": "adapter", "name": "x", "data": {"type": "builtin", "name": "construction-faq"}})
    with pytest.raises(RuntimeError, match="stop here"):
        run.run_recipe(recipe)
    assert calls == ["seed", "set"]

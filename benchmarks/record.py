"""What every benchmark result file holds besides its numbers: machine, versions, command, time.

from record import write_result
write_result("cache_speed", {"ratio": 0.01, ...})   # -> benchmarks/results/cache_speed.json
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """Processor, core count, torch threads and the GPU if one is visible."""
    import torch

    info = {
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_result(name: str, payload: dict, out: str | Path | None = None) -> Path:
    """Write ``payload`` with machine, versions and the command line to ``results/<name>.json`` (atomically)."""
    from finetune.atomic import write_json
    from finetune.rundir import versions

    path = Path(out) if out else RESULTS / f"{name}.json"
    record = {
        "benchmark": name,
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": "python " + shlex.join(sys.argv),
        "machine": machine(),
        "versions": versions(),
        **payload,
    }
    write_json(path, record)
    print(f"wrote {path}")
    return path

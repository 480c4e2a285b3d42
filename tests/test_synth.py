"""synth: chunking, parsing LLM answers, retries, resume after a kill, and training on the result.

Every request goes to a fake OpenAI-compatible server on 127.0.0.1 started by the test."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI

from finetune.cli import main
from finetune.synth.chunking import load_chunks, split_text
from finetune.synth.questions import keep, parse_questions

KEY = "sk-test-SECRET-0123456789"
TOPICS = ["roof", "radon", "permit", "window", "garage", "kitchen", "drain", "solar"]


def _docs(folder: Path, markers: dict[int, str] | None = None, n: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        marker = (markers or {}).get(i, "")
        rules = f"The {topic} rules for house number {i}: inspect the {topic} yearly. {marker}"
        body = f"# {topic.title()} guide {i}\n\n{rules}\n"
        (folder / f"{i:02d}-{topic}.md").write_text(body)
    return folder


def test_split_text_respects_size_overlap_and_headings():
    text = "# One\n" + "alpha beta gamma. " * 20 + "\n\n# Two\n" + "delta epsilon. " * 20
    chunks = split_text(text, size=120, overlap=40)
    assert all(len(c) <= 120 for c in chunks) and chunks[0].startswith("# One")
    assert any(c.startswith("# Two") for c in chunks)  # a heading starts a chunk rather than ending one
    for a, b in zip(chunks, chunks[1:]):
        assert a.split()[-1] in b or b.startswith("# ")  # neighbours overlap
    with pytest.raises(ValueError, match="overlap"):
        split_text("x", size=10, overlap=10)


def test_load_chunks_from_a_folder_and_from_jsonl(tmp_path):
    chunks = load_chunks(_docs(tmp_path / "docs"), size=500, overlap=50)
    assert [c.id for c in chunks][:2] == ["00-roof.md#0", "01-radon.md#0"] and chunks[0].source == "00-roof.md"
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"id": "a", "text": "first"}\n{"id": "a", "text": "second"}\n')
    with pytest.raises(Exception, match="line 2: duplicate id 'a'"):
        load_chunks(jsonl)


@pytest.mark.parametrize(
    "answer, expected",
    [
        ('["Where?", "Why is it so?"]', ["Where?", "Why is it so?"]),
        ('Sure!\n```json\n{"questions": ["Where?"]}\n```\nBye', ["Where?"]),
        ('[{"question": "How much?"}]', ["How much?"]),
        ("Here:\n1. How big is it?\n2) Who pays?\n- Is it legal?", ["How big is it?", "Who pays?", "Is it legal?"]),
        ("I cannot help with that.", None),
        ('{"questions": []}', None),
    ],
)
def test_parse_questions(answer, expected):
    assert parse_questions(answer) == expected


def test_questions_that_copy_the_chunk_are_dropped():
    chunk = "The municipality requires a building permit for any carport larger than fifteen square metres in area."
    assert keep("do i need a permit for a big carport?", chunk) is None
    assert keep("requires a building permit for any carport larger than fifteen square?", chunk) == "copied"
    assert keep("why?", chunk) == "length"


def _synth_args(docs, out, url, *extra):
    return [
        "synth",
        "--chunks",
        str(docs),
        "--out",
        str(out),
        "--base-url",
        url,
        "--model",
        "fake-llm",
        "--api-key-env",
        "FAKE_KEY",
        "--per-chunk",
        "3",
        "--timeout",
        "0.5",
        *extra,
    ]


def test_synth_survives_429_500_slow_and_garbled_answers_and_the_recipe_trains_on_it(
    tmp_path, tiny_model, monkeypatch, capsys
):
    monkeypatch.setenv("FAKE_KEY", KEY)
    markers = {1: "[429]", 2: "[500]", 3: "[slow]", 4: "[garbled]", 5: "[fenced]"}
    docs, out = _docs(tmp_path / "docs", markers), tmp_path / "pairs.jsonl"
    with FakeOpenAI(slow_seconds=1.5) as fake:
        assert main(_synth_args(docs, out, fake.base_url, "--concurrency", "3")) == 0
    report = capsys.readouterr().out
    assert "8 chunks: 0 done earlier, 8 now, 0 failed; 24 pairs written" in report and "duplicate" in report
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 24 and len({r["query"] for r in rows}) == 24  # 3 per chunk, the repeated question dropped
    assert {r["chunk_id"] for r in rows} == {f"{i:02d}-{TOPICS[i]}.md#0" for i in range(8)}
    assert all(r["positive"].startswith("# ") and set(r) == {"query", "positive", "chunk_id", "source"} for r in rows)
    statuses = {}
    for r in fake.requests:
        statuses.setdefault(re.search(r"guide (\d+)", r["passage"]).group(1), []).append(r["status"])
    assert statuses["1"] == [429, 200] and statuses["2"] == [500, 200] and statuses["0"] == [200]
    assert len(statuses["3"]) == 2 and len(statuses["4"]) == 2  # timed out once; no questions once
    assert {r["auth"] for r in fake.requests} == {f"Bearer {KEY}"}
    assert (
        KEY not in out.read_text()
        and KEY not in (tmp_path / "pairs.jsonl.progress.jsonl").read_text()
        and KEY not in report
    )

    # the adapter recipe reads the pairs file as it is: only the data path (and, here, the tiny model) change
    run = [
        "run",
        "recipes/adapter.yaml",
        f"data={out}",
        f"model.name={tiny_model}",
        f"output.dir={tmp_path / 'runs'}",
        f"cache.dir={tmp_path / 'cache'}",
        "train.epochs=2",
    ]
    assert main(run) == 0
    metrics = json.loads(next((tmp_path / "runs").glob("*/metrics.json")).read_text())
    assert metrics["n_corpus"] == 8 and sum(metrics["splits"].values()) == 24


def test_a_chunk_that_always_fails_is_reported_and_retried_alone_next_time(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_KEY", KEY)
    docs, out = _docs(tmp_path / "docs", {2: "[never]"}, n=4), tmp_path / "pairs.jsonl"
    with FakeOpenAI() as fake:
        assert main(_synth_args(docs, out, fake.base_url, "--max-retries", "1")) == 1
        assert "1 chunk(s) failed" in capsys.readouterr().err
        assert len(out.read_text().splitlines()) == 9  # the three good chunks are written anyway
        before = len(fake.requests)
        assert main(_synth_args(docs, out, fake.base_url, "--max-retries", "0")) == 1
        assert {re.search(r"guide (\d+)", r["passage"]).group(1) for r in fake.requests[before:]} == {
            "2"
        }  # only the failed one again
        assert main(_synth_args(docs, out, fake.base_url, "--per-chunk", "4")) == 2  # other settings: refuse to mix
        assert "other settings (per_chunk 3, now 4)" in capsys.readouterr().err


def test_killed_synth_resumes_without_losing_or_repeating_a_finished_chunk(tmp_path):
    docs, out = _docs(tmp_path / "docs", n=24), tmp_path / "pairs.jsonl"
    progress = tmp_path / "pairs.jsonl.progress.jsonl"
    with FakeOpenAI(delay=0.15) as fake:
        env = dict(os.environ, FAKE_KEY=KEY)
        proc = subprocess.Popen(
            [sys.executable, "-m", "finetune", *_synth_args(docs, out, fake.base_url, "--concurrency", "2")],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 60
        while time.time() < deadline and (not progress.exists() or progress.read_text().count('"chunk"') < 6):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        finished = {json.loads(line)["chunk"] for line in progress.read_text().splitlines() if '"chunk"' in line}
        assert 6 <= len(finished) < 24 and not out.exists()  # killed mid-run: no pairs file yet
        assert main(_synth_args(docs, out, fake.base_url, "--concurrency", "2")) == 0
    asked = {}
    for r in fake.requests:
        number = int(re.search(r"guide (\d+)", r["passage"]).group(1))
        asked[f"{number:02d}"] = asked.get(f"{number:02d}", 0) + 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len({r["chunk_id"] for r in rows}) == 24  # nothing lost
    for chunk_id in finished:
        assert asked[chunk_id[:2]] == 1, chunk_id  # nothing finished was asked for again

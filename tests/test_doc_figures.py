"""Every metric figure in the docs is a measured one: found in a ``benchmarks/results/`` file that a script wrote.

A figure is a decimal of three or four places (``0.7534``, ``+0.0140``, ``−0.005``) in a paragraph, table
or code block that names a metric (NDCG, MRR, MAP, recall, accuracy). It passes when a number in a
results file rounds to it (or to its negation), or when it is the difference of two other figures of
the same block (``0.8204 -> 0.8154 (-0.0050)``). Only the results files that the figure's section
(from one heading to the next) cites (``results/NAME.json``) count, and a section with figures must
cite one: against all 3,500 numbers in the folder, most figures would match something by chance. A
block that is an illustration, not a measurement, says so with ``<!-- illustration -->`` on a line.
"""

import bisect
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
METRIC = re.compile(r"ndcg|mrr|map@|recall|accuracy", re.IGNORECASE)
FIGURE = re.compile(r"(?<![\w.])[+\-−]?0\.\d{3,4}(?!\d)")
ILLUSTRATION = "<!-- illustration -->"


def _numbers(node, out: list[float]) -> None:
    if isinstance(node, bool):
        return
    if isinstance(node, (int, float)):
        out.append(float(node))
    elif isinstance(node, dict):
        for value in node.values():
            _numbers(value, out)
    elif isinstance(node, list):
        for value in node:
            _numbers(value, out)


RESULTS = ROOT / "benchmarks" / "results"
CITED = re.compile(r"results/([\w.-]+\.json)")


def measured(names) -> list[float]:
    """Every number in the named results files, sorted."""
    out: list[float] = []
    for name in names:
        _numbers(json.loads((RESULTS / name).read_text()), out)
    return sorted(set(out))


def sections(text: str) -> list[str]:
    """The text split at markdown headings (outside code blocks), each heading with what follows it."""
    out, current, fenced = [], [], False
    for line in text.splitlines():
        fenced ^= line.startswith("```")
        if line.startswith("#") and not fenced and current:
            out.append("\n".join(current))
            current = []
        current.append(line)
    return out + ["\n".join(current)]


def blocks(text: str) -> list[list[tuple[int, str]]]:
    """Runs of non-blank lines, with their line numbers."""
    out, current = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            current.append((number, line))
        elif current:
            out.append(current)
            current = []
    return out + ([current] if current else [])


def figures(block) -> list[tuple[int, str, float, int]]:
    """(line, text, value, decimals) of each figure in a block that names a metric."""
    if not any(METRIC.search(line) for _, line in block) or any(ILLUSTRATION in line for _, line in block):
        return []
    out = []
    for number, line in block:
        for match in FIGURE.finditer(line):
            text = match.group().replace("−", "-")
            out.append((number, text, float(text), len(text.split(".")[1])))
    return out


def _near(values: list[float], x: float, tolerance: float) -> bool:
    i = bisect.bisect_left(values, x - tolerance)
    return i < len(values) and values[i] <= x + tolerance


def unmeasured(text: str, values: list[float]) -> list[tuple[int, str]]:
    missing = []
    for block in blocks(text):
        found = figures(block)
        shown = [v for _, _, v, _ in found]
        for number, figure, value, decimals in found:
            half = 0.5 * 10**-decimals + 1e-12
            derived = any(abs(abs(a - b) - abs(value)) <= 2 * half for a in shown for b in shown if a != value != b)
            if not (_near(values, value, half) or _near(values, -value, half) or derived):
                missing.append((number, figure))
    return missing


def uncited(section: str) -> list[tuple[int, str]]:
    """A section with figures but no results file named: each figure is reported, to be cited."""
    return [
        (n, f"{figure} (the section cites no results file)") for b in blocks(section) for n, figure, *_ in figures(b)
    ]


def test_every_metric_figure_in_the_docs_is_in_a_results_file():
    missing = {}
    for doc in DOCS:
        offset = 0
        for section in sections(doc.read_text()):
            cited = {name for name in CITED.findall(section) if (RESULTS / name).is_file()}
            found = unmeasured(section, measured(cited)) if cited else uncited(section)
            missing.setdefault(str(doc.relative_to(ROOT)), []).extend((offset + n, f) for n, f in found)
            offset += section.count("\n") + 1
    missing = {doc: found for doc, found in missing.items() if found}
    assert not missing, f"figures with no results file behind them (line, figure): {missing}"


def test_the_scan_finds_a_figure_that_was_never_measured():
    values = [0.6734, 0.7534]
    text = "NDCG@10 went from 0.6734 to 0.7534.\n\nNDCG@10 went from 0.6734 to 0.7612.\n"
    assert unmeasured(text, values) == [(3, "0.7612")]
    assert unmeasured("NDCG@10: 0.6734 -> 0.7534 (+0.0800)\n", values) == []  # a difference shown beside
    assert unmeasured("A speed of 0.7612 s, no metric here.\n", values) == []
    assert unmeasured(f"{ILLUSTRATION}\nndcg@10 0.1234\n", values) == []

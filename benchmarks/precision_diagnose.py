"""Why a tuned model kept less of its gain at int8: diagnostics of its embeddings, the old int8 scoring beside the new.

For each finished run, its checkpoint (``base``) and its exported ``model/`` (``tuned``) encode the run's test
queries and the whole corpus with plain sentence-transformers. For each model the script scores and measures:

- test NDCG@10 at float32, int8 and binary as the run's ``precision`` stage computes them now
  (:mod:`finetune.precision`; ``recorded`` is what the run wrote, with the code it ran);
- ``int8_codes_dot_product``: int8 as the stage scored it before, the codes' dot product alone. A code is
  ``(x - c) / step`` in each dimension, c the range's midpoint, so that product weighs dimensions by
  ``1 / step^2`` and adds a document-dependent term from the offsets, a bias that grows with how far the
  cloud sits off the origin;
- ``int8_scored_on_values``: every document scored by the float query against the values its codes stand for
  (rounding alone), and ``int8_symmetric``: a unit vector's coordinates times 127 (usearch's ``i8``);
- ``int8_calibrated_with_queries``: the old scoring with ranges calibrated on corpus and queries together;
- ``binary_centred``: binary with the corpus mean subtracted before the sign;
- the cloud: the length of the mean normalised corpus vector and query vector (0: centred, 1: one point),
  the share of query coordinates outside the corpus's ranges, the int8 step, the spread of the offset term.

    python benchmarks/precision_diagnose.py runs/rr/qlora-faq-minilm runs/rr/adapter-faq runs/rr/qlora-disfl-60 \
        runs/rr/adapter-disfl runs/rr/distill-disfl-60 runs/rr/distill-faq-inbatch-w1-t0.1 --name precision_diagnose
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import write_result  # noqa: E402


def run_inputs(run: Path):
    """The run's recipe, data and test query ids."""
    import yaml

    from finetune.data import load_data
    from finetune.recipe import validate_recipe

    recipe = validate_recipe(yaml.safe_load((run / "recipe.yaml").read_text()))
    return recipe, load_data(recipe.data), json.loads((run / "splits.json").read_text())["test"]


def embeddings(model_name: str, data, test: list[str], batch: int):
    """``model_name``'s test-query and corpus embeddings (normalised), as plain sentence-transformers encodes."""
    from sentence_transformers import SentenceTransformer

    from finetune.models import resolve_model

    model = SentenceTransformer(str(resolve_model(model_name).path), device="cpu", local_files_only=True)
    q = model.encode_query([data.queries[i] for i in test], batch_size=batch, convert_to_tensor=True).float()
    d = model.encode_document(list(data.corpus.values()), batch_size=batch, convert_to_tensor=True).float()
    normalise = torch.nn.functional.normalize
    return normalise(q, dim=1), normalise(d, dim=1)


def ndcg(top: torch.Tensor, relevant: list[set[int]]) -> float:
    from finetune.precision import ndcg_at_10

    return float(np.mean([ndcg_at_10(row.tolist(), rel) for row, rel in zip(top, relevant)]))


def int8_ndcg(
    q: torch.Tensor, d: torch.Tensor, relevant: list[set[int]], calibration: torch.Tensor, score: str = "codes"
) -> float:
    """int8 with the ranges taken from ``calibration``, scored as the run does (``codes``: the dot product of the
    int8 codes), or on the values the codes stand for (``values``: each code mapped back into its range)."""
    from sentence_transformers.util import quantize_embeddings

    from finetune.precision import top_rows

    low, high = calibration.min(0).values.double(), calibration.max(0).values.double()
    ranges = np.vstack([low.numpy(), high.numpy()])

    def as_int8(x: torch.Tensor) -> torch.Tensor:
        codes = torch.from_numpy(quantize_embeddings(x.numpy(), "int8", ranges=ranges)).double()
        return codes if score == "codes" else low + (codes + 128) * (high - low) / 255

    return ndcg(top_rows(as_int8(q), d, 10, lambda a, b: a @ as_int8(b).T), relevant)


def symmetric_int8_ndcg(q: torch.Tensor, d: torch.Tensor, relevant: list[set[int]]) -> float:
    """int8 without per-dimension offsets: every coordinate of a unit vector times 127, rounded (usearch's i8)."""
    from finetune.precision import top_rows

    def codes(x: torch.Tensor) -> torch.Tensor:
        return torch.round(x.double() * 127).clamp(-127, 127)

    return ndcg(top_rows(codes(q), d, 10, lambda a, b: a @ codes(b).T), relevant)


def diagnose(q: torch.Tensor, d: torch.Tensor, relevant: list[set[int]]) -> dict:
    """Every figure of the module docstring for one model's test queries ``q`` and corpus ``d`` (normalised)."""
    from finetune.precision import PRECISIONS, ndcg_at_precision

    centre, low, high = d.mean(0), d.min(0).values, d.max(0).values
    return {
        "ndcg@10": {p: ndcg_at_precision(q, d, relevant, p) for p in PRECISIONS},
        "int8_codes_dot_product": int8_ndcg(q, d, relevant, d),
        "int8_scored_on_values": int8_ndcg(q, d, relevant, d, score="values"),
        "int8_symmetric": symmetric_int8_ndcg(q, d, relevant),
        "int8_calibrated_with_queries": int8_ndcg(q, d, relevant, torch.cat([d, q])),
        "binary_centred": ndcg_at_precision(q - centre, d - centre, relevant, "binary"),
        "corpus_mean_length": float(centre.norm()),
        "query_mean_length": float(q.mean(0).norm()),
        "query_coordinates_outside_corpus_range": float(((q < low) | (q > high)).float().mean()),
        "int8_step": float(((high - low) / 255).mean()),
        "offset_term_spread": float(((high + low) / 2 @ d.T).std()),
    }


def run_row(run: Path, bases: dict) -> dict:
    """The run's base and tuned models diagnosed (the base once per checkpoint, data and test split)."""
    from finetune.precision import relevant_rows

    recipe, data, test = run_inputs(run)
    relevant = relevant_rows(data, test)
    key = (recipe.model.name, str(recipe.data), tuple(test))
    if key not in bases:
        bases[key] = diagnose(*embeddings(recipe.model.name, data, test, recipe.model.batch_size), relevant)
    metrics = json.loads((run / "metrics.json").read_text())
    return {
        "run": str(run),
        "kind": metrics["kind"],
        "recorded": metrics["precision"],
        "base": bases[key],
        "tuned": diagnose(*embeddings(str(run / "model"), data, test, recipe.model.batch_size), relevant),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run directories (qlora or adapter)")
    parser.add_argument("--name", default="precision_diagnose")
    args = parser.parse_args()
    rows, bases = [], {}
    for run in args.runs:
        row = run_row(run, bases)
        rows.append(row)
        for model in ("base", "tuned"):
            n, old = row[model]["ndcg@10"], row[model]["int8_codes_dot_product"]
            print(
                f"{run} {model}: float32 {n['float32']:.4f}, int8 {n['int8']:.4f} (codes alone {old:.4f}), "
                f"binary {n['binary']:.4f}; mean corpus vector {row[model]['corpus_mean_length']:.3f}"
            )
    write_result(args.name, {"runs": rows})


if __name__ == "__main__":
    main()

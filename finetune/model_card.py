"""The exported model's card (``model/README.md``), written for the run: what it was fine-tuned from, how,
on what data, and what it scored.

sentence-transformers' own machinery writes the card (``SentenceTransformerModelCardData``: the
metadata block with ``base_model`` and a ``model-index`` the Hub renders, the architecture, the
``encode_query``/``encode_document`` usage snippet). Without this module the exported folder would carry
the base checkpoint's card, which names the base's training data, or a blank template. This module fills
the card data from the run and adds one section of its own: the recipe, the data, the test table with
its paired interval, and, for the adapter kinds, which side of the model changed.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from finetune.atomic import write_text
from finetune.evaluation import HEADLINE

TAGS = ["finetune", "retrieval"]


def base_card_facts(model_name: str) -> dict:
    """``base_model`` (a Hub id, or None for a local folder), ``license`` and ``language`` of the checkpoint
    ``model_name``, read from its own card's metadata where it has one.

    Example:
        >>> base_card_facts("all-MiniLM-L6-v2")["license"]
        'apache-2.0'
    """
    from finetune.models import _canonical, resolve_model

    resolved = resolve_model(model_name)
    meta = {}
    readme = resolved.path / "README.md"
    if readme.is_file():
        text = readme.read_text(encoding="utf-8", errors="replace")
        if text.startswith("---"):
            try:
                meta = yaml.safe_load(text.split("---", 2)[1]) or {}
            except yaml.YAMLError:
                meta = {}
    hub_id = None if resolved.source == "local" else _canonical(model_name)
    language = meta.get("language")
    return {
        "base_model": hub_id,
        "license": meta.get("license"),
        "language": [language] if isinstance(language, str) else language or [],
    }


def data_label(recipe) -> str:
    """The data's short name: a builtin's or Hub set's name, else the file or folder name.

    Example:
        >>> from finetune.recipe import load_recipe
        >>> data_label(load_recipe("recipes/qlora.yaml", ["data=my_corpus/"]))
        'my_corpus'
    """
    name = recipe.data.name or recipe.data.path or "data"
    return Path(name.rstrip("/")).stem if recipe.data.path and not recipe.data.name else name


def write_model_card(folder: Path, model, recipe, result: dict, fingerprint: str | None, kind: dict) -> None:
    """Write ``folder/README.md``: the card of the exported ``model`` (the object saved in ``folder``).

    Args:
        folder: The run's ``model/``.
        model: The exported ``SentenceTransformer``; its card data is replaced by the run's.
        recipe: The resolved recipe.
        result: The run's ``metrics.json`` fields (``base``, ``tuned``, ``significance``, ``also`` ...).
        fingerprint: The data fingerprint from ``splits.json``.
        kind: What the kind says of its model (:attr:`finetune.outcome.Outcome.card`): ``base`` (the
            checkpoint's name), ``base_label`` (the base row's name), ``method`` and ``changed`` (one line each).
    """
    label = data_label(recipe)
    facts = base_card_facts(kind["base"])
    name = f"{Path(kind['base']).name} fine-tuned on {label} ({recipe.kind})"
    if getattr(model, "model_type", None) == "CrossEncoder":
        text = _cross_encoder_card(model, facts, name)
    else:
        text = _bi_encoder_card(model, facts, name, label, result)
    prompts = {k: v for k, v in (model.prompts or {}).items() if k in ("query", "document") and v}
    section = run_section(recipe, result, label, fingerprint, kind | {"prompts": prompts}, facts["base_model"])
    marker = "\n## Usage\n"
    text = text.replace(marker, f"\n{section}\n{marker}", 1) if marker in text else f"{text}\n{section}"
    write_text(folder / "README.md", text)


def _bi_encoder_card(model, facts: dict, name: str, label: str, result: dict) -> str:
    """sentence-transformers' card of a ``SentenceTransformer``, its data filled from the run."""
    from sentence_transformers.base.model_card import generate_model_card
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
    from sentence_transformers.sentence_transformer.model_card import SentenceTransformerModelCardData

    card = SentenceTransformerModelCardData(
        language=facts["language"],
        license=facts["license"],
        model_name=name,
        local_files_only=True,  # no Hub lookups: the base model is named from the recipe, the data is the user's
        tags=["sentence-transformers", "sentence-similarity", "feature-extraction", *TAGS],
    )
    card.base_model = facts["base_model"]
    card.ir_model = True  # the usage snippet shows encode_query / encode_document
    model.model_card_data = card
    card.register_model(model)
    evaluator = InformationRetrievalEvaluator({}, {}, {}, name=f"{label}-test")  # names the metrics only
    card.set_evaluation_metrics(evaluator, {f"{evaluator.name}_cosine_{m}": result["tuned"][m] for m in HEADLINE})
    card.training_logs = _validation_logs(result)
    return generate_model_card(model)


def _cross_encoder_card(model, facts: dict, name: str) -> str:
    """sentence-transformers' card of a ``CrossEncoder`` (a reranker run's): its ``predict``/``rank`` usage."""
    from sentence_transformers.base.model_card import generate_model_card
    from sentence_transformers.cross_encoder.model_card import CrossEncoderModelCardData

    card = CrossEncoderModelCardData(
        language=facts["language"],
        license=facts["license"],
        model_name=name,
        local_files_only=True,
        tags=["sentence-transformers", "cross-encoder", "reranker", *TAGS],
    )
    card.base_model = facts["base_model"]
    model.model_card_data = card
    card.register_model(model)
    return generate_model_card(model)


def run_section(recipe, result: dict, data_label: str, fingerprint: str | None, kind: dict, hub_id) -> str:
    """The card's own section: how the model was made and what it scored (markdown)."""
    base = f"[{hub_id}](https://huggingface.co/{hub_id})" if hub_id else f"`{kind['base']}`"
    splits = result["splits"]
    data = (
        f"{data_label}: {result['n_corpus']:,} documents; queries train {splits.get('train', 0):,}, "
        f"validation {splits.get('val', 0):,}, test {splits.get('test', 0):,}"
    )
    rows = [
        ("Base checkpoint", base),
        ("Recipe", f"`{recipe.name}` (kind `{recipe.kind}`), seed {recipe.seed}"),
        ("Method", kind["method"]),
        ("What changed", kind["changed"]),
        ("Training data", data + (f"; data fingerprint `{fingerprint}`" if fingerprint else "")),
    ]
    if kind.get("prompts"):  # the usage snippet's encode_query / encode_document apply them
        said = "; ".join(f"`encode_{k}` prepends {v!r}" for k, v in kind["prompts"].items())
        rows.append(("Prompts", f"{said} (saved with the model)"))
    onnx = ((result.get("export") or {}).get("onnx")) or {}
    if onnx.get("files"):
        rows.append((
            "ONNX",
            f"`{onnx['files']['fp32']}` (fp32, min cosine to PyTorch {onnx['fp32_min_cosine']:.5f}), "
            f"`{onnx['files']['int8']}` (int8: test NDCG@10 {onnx['int8_ndcg@10']:.4f}, PyTorch "
            f"{onnx['pytorch_ndcg@10']:.4f}, on {onnx['documents']:,} documents)",
        ))  # fmt: skip
    scale = (result.get("merge") or {}).get("scale")
    if scale is not None and scale != 1.0:
        rows.append(("Merge scale", f"{scale:g} (the trained change, scaled; chosen on validation)"))
    lines = [
        "## How this model was made",
        "",
        "Fine-tuned for retrieval with `finetune` and scored on a held-out test split "
        "by sentence-transformers' `InformationRetrievalEvaluator`.",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
        "",
        *results_table(result, kind.get("base_label", "base")),
    ]
    if result.get("precision"):
        lines += ["", *precision_table(result["precision"])]
    if result.get("also"):
        lines += ["", "### Other sets (`eval.also`)", "", "| set | queries | documents | base | fine-tuned | Δ |"]
        lines += ["|---|---:|---:|---:|---:|---:|"]
        for label, r in result["also"].items():
            b, t = r["base"]["ndcg@10"], r["tuned"]["ndcg@10"]
            lines.append(f"| {label} | {r['n_test']:,} | {r['n_corpus']:,} | {b:.4f} | {t:.4f} | {t - b:+.4f} |")
        lines.append("\nNDCG@10 on each set's test split, over its whole corpus.")
    return "\n".join(lines) + "\n"


def results_table(result: dict, base_label: str = "base") -> list[str]:
    """Base against fine-tuned on the test split, with the paired interval and p-value of each per-query metric."""
    lines = [
        "### Test results",
        "",
        f"{result['splits'].get('test', 0):,} test queries against {result['n_corpus']:,} documents.",
        "",
        f"| metric | {base_label} | fine-tuned | Δ | paired 95% interval | p |",
        "|---|---:|---:|---:|---|---:|",
    ]
    stats = result.get("significance") or {}
    for m in HEADLINE:
        b, t = result["base"].get(m), result["tuned"].get(m)
        if b is None or t is None:
            continue
        s = stats.get(m)
        interval = f"[{s['ci_low']:+.4f}, {s['ci_high']:+.4f}]" if s else ""
        p = f"{s['p_value']:.4f}" if s else ""
        lines.append(f"| {m} | {b:.4f} | {t:.4f} | {t - b:+.4f} | {interval} | {p} |")
    if stats:
        n = next(iter(stats.values()))["n"]
        lines += ["", f"Intervals: paired bootstrap over the {n:,} test queries (tuned − base)."]
    return lines


def precision_table(record: dict) -> list[str]:
    """Test NDCG@10 with the document vectors stored at lower precision, as a vector database would hold them."""
    from finetune.precision import PRECISIONS, RESCORE

    lines = [
        "### Stored precision",
        "",
        f"Test NDCG@10 with the vectors stored as int8 or binary (sentence-transformers' `quantize_embeddings`), "
        f"the top {RESCORE} by the stored vectors rescored by the float query.",
        "",
        "| stored as | base | fine-tuned | Δ |",
        "|---|---:|---:|---:|",
    ]
    for p in PRECISIONS:
        b, t = record["base"][p], record["tuned"][p]
        lines.append(f"| {p} | {b:.4f} | {t:.4f} | {t - b:+.4f} |")
    return lines


def _validation_logs(result: dict) -> list[dict]:
    """The trainer's validation NDCG@10 by step (qlora), for the card's training-log table."""
    rows = []
    for entry in result.get("log_history") or []:
        ndcg = next((v for k, v in entry.items() if k.startswith("eval_") and k.endswith("ndcg@10")), None)
        if ndcg is not None:
            rows.append({"Epoch": round(entry.get("epoch", 0), 2), "Step": entry.get("step"), "val ndcg@10": ndcg})
    return rows

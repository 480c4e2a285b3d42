"""Full-size encoder shapes for memory and speed benchmarks, built from configs with random weights.

Memory and step time do not depend on the weights' values, so each shape is a published
model's config (layers, widths, heads, vocabulary) with random initialisation: nothing is
downloaded. :func:`random_checkpoint` saves one as a sentence-transformers folder (random bf16
weights, the shape's pooling, a small word-level tokenizer) that the toolkit's own
``build_encoder`` loads exactly as it loads a real checkpoint: 4-bit, 16-bit or full.

    from memory_shapes import SHAPES, config_of, random_checkpoint
    folder = random_checkpoint("bert-base", "/tmp/shapes")
"""

from __future__ import annotations

import json
from pathlib import Path

# (model_type, config fields, pooling): the published models' sizes
SHAPES: dict[str, tuple[str, dict, str]] = {
    "bert-base": (
        "bert",
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=30522),
        "mean",
    ),
    "bert-large": (
        "bert",
        dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, vocab_size=30522),
        "mean",
    ),
    "modernbert-base": (
        "modernbert",
        dict(hidden_size=768, num_hidden_layers=22, num_attention_heads=12, intermediate_size=1152, vocab_size=50368),
        "mean",
    ),
    "modernbert-large": (
        "modernbert",
        dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, intermediate_size=2624, vocab_size=50368),
        "mean",
    ),
    "gemma3-300m": (  # EmbeddingGemma-shaped: Gemma3 text, bidirectional attention
        "gemma3_text",
        dict(
            hidden_size=768,
            num_hidden_layers=24,
            num_attention_heads=3,
            num_key_value_heads=1,
            head_dim=256,
            intermediate_size=1152,
            vocab_size=262144,
            sliding_window=512,
            use_bidirectional_attention=True,
        ),
        "mean",
    ),
    "qwen3-0.6b": (
        "qwen3",
        dict(
            hidden_size=1024,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            intermediate_size=3072,
            vocab_size=151936,
            tie_word_embeddings=True,
        ),
        "lasttoken",
    ),
    "qwen3-4b": (
        "qwen3",
        dict(
            hidden_size=2560,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            intermediate_size=9728,
            vocab_size=151936,
            tie_word_embeddings=True,
        ),
        "lasttoken",
    ),
    # for smoke tests of the benchmark scripts themselves
    "tiny-bert": (
        "bert",
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=1000),
        "mean",
    ),
}


def config_of(name: str, max_positions: int = 1024):
    """The ``transformers`` config of shape ``name``."""
    from transformers import AutoConfig

    model_type, fields, _ = SHAPES[name]
    fields = dict(fields)
    if model_type in ("bert",):
        fields.setdefault("max_position_embeddings", max(512, max_positions))
    return AutoConfig.for_model(model_type, **fields)


def _tokenizer():
    """A word-level tokenizer over a few words: benchmarks feed token ids directly, loading needs one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>", "a", "b"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def random_checkpoint(name: str, root: str | Path, device: str = "cpu", max_seq_length: int = 512) -> Path:
    """Save shape ``name`` with random bf16 weights as a sentence-transformers folder (once; reused after)."""
    import torch
    from transformers import AutoModel

    folder = Path(root) / name
    if (folder / "modules.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModel.from_config(config_of(name, max_seq_length), dtype=torch.bfloat16)
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    del model
    _, fields, pooling = SHAPES[name]
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": fields["hidden_size"], "pooling_mode": pooling})
    )
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))  # written last: it marks the folder complete
    return folder

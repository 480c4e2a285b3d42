"""The query route of a ``projection.input: both`` export: both encoders read the query, one vector out.

Sentence-transformers routes a query through one chain of modules, each fed by the one before,
so a query embedding built from *two* encoders needs one module that holds both. :class:`MixedQuery`
is that module: it tokenises the text once per encoder (each with its own query prompt), runs both,
and applies the trained :class:`~finetune.cross.projection.Projection`. The document route stays the
small encoder alone, so the existing index is still valid. Loading the folder needs this package
installed (``SentenceTransformer(folder)`` imports the class by name), never ``trust_remote_code``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from sentence_transformers.base.modules import InputModule

from finetune.cross.projection import Projection, load_projection, save_projection


class MixedQuery(InputModule):
    """``projection([normalize(large(text)); normalize(small(text))])`` as one sentence-transformers module.

    Args:
        large: The large query encoder (a ``SentenceTransformer``).
        small: The small encoder (a ``SentenceTransformer``; the same one the documents use).
        projection: An ``input: both`` projection.
        large_prompt: Prepended to queries for the large encoder.
        small_prompt: Prepended to queries for the small encoder.

    Example (not run: it needs a model, data or a server)::
        model = SentenceTransformer("runs/cross-adapter-faq-.../model")   # query route: MixedQuery
        model.encode_query(["how do I get a building permit?"]).shape
        (1, 384)
    """

    config_keys = ["large_prompt", "small_prompt"]
    save_in_root = False

    def __init__(self, large, small, projection: Projection, large_prompt: str | None = None, small_prompt=None):
        super().__init__()
        if projection.input != "both":
            raise ValueError("MixedQuery needs an input: both projection")
        self.large, self.small, self.projection = large, small, projection
        self.large_prompt, self.small_prompt = large_prompt, small_prompt

    @property
    def tokenizer(self):  # what sentence-transformers reads for a max length; the large encoder's
        return self.large.tokenizer

    def preprocess(self, inputs, prompt: str | None = None, **kwargs) -> dict:
        texts = [(prompt or "") + t for t in inputs]
        features = {}
        for name, model, own in (("large", self.large, self.large_prompt), ("small", self.small, self.small_prompt)):
            tokens = model.preprocess([(own or "") + t for t in texts])
            features.update({f"{name}.{k}": v for k, v in tokens.items()})
        return features

    def forward(self, features: dict, **kwargs) -> dict:
        def embed(name: str, model) -> torch.Tensor:
            own = {k.split(".", 1)[1]: v for k, v in features.items() if k.startswith(name + ".")}
            return F.normalize(model(own)["sentence_embedding"], dim=-1)

        both = torch.cat([embed("large", self.large), embed("small", self.small)], dim=1)
        features["sentence_embedding"] = self.projection(both.to(self.projection.small_weight.dtype))
        return features

    def get_embedding_dimension(self) -> int:
        return self.projection.d_out

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.large.save(str(Path(output_path) / "large"))
        self.small.save(str(Path(output_path) / "small"))
        save_projection(self.projection, output_path)
        self.save_config(output_path)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", **kwargs) -> MixedQuery:
        from sentence_transformers import SentenceTransformer

        folder = Path(model_name_or_path) / subfolder
        config = cls.load_config(str(model_name_or_path), subfolder=subfolder)
        return cls(
            SentenceTransformer(str(folder / "large"), device="cpu"),
            SentenceTransformer(str(folder / "small"), device="cpu"),
            load_projection(folder),
            **config,
        )

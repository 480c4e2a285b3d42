"""Data loading: every source becomes one :class:`RetrievalData`."""

from finetune.data.dataset import RetrievalData
from finetune.data.sources import load_beir, load_data, load_faq, load_hf, pairs_to_data

__all__ = ["RetrievalData", "load_data", "load_faq", "load_beir", "load_hf", "pairs_to_data"]

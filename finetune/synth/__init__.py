"""Synthetic training pairs: chunk documents, ask an LLM for the questions each chunk answers.

``python -m finetune synth --chunks docs/ --out pairs.jsonl`` (see :func:`finetune.synth.generate.synthesize`).
"""

"""finetune: make text embedding models better at retrieval on your own documents.

Two recipe families share one data layer, one set of splits and one evaluator:

- ``adapter``: a query adapter trained over cached embeddings of a frozen encoder.

Example (not run: it needs a model, data or a server)::
    from finetune import load_recipe, run_recipe
    run_dir = run_recipe(load_recipe("recipes/adapter.yaml", ["train.epochs=5"]))
"""

__version__ = "0.1.0"

from finetune.errors import FinetuneError
from finetune.recipe import load_recipe


def run_recipe(*args, **kwargs):
    """See :func:`finetune.run.run_recipe` (imported lazily: it pulls in torch and sentence-transformers)."""
    from finetune.run import run_recipe as _run

    return _run(*args, **kwargs)


__all__ = ["FinetuneError", "load_recipe", "run_recipe", "__version__"]

"""CUDA autocast's dtype rules, applied to meta tensors, so the planner counts activations in the
dtypes a GPU run keeps them in.

``torch.autocast`` acts on CUDA (or CPU) tensors only, and a meta tensor is neither; yet what a
bf16 training step keeps for backward depends on autocast's choices: matrix products run in bf16
(their inputs are cast, and the casts are saved), while layer norm, softmax, pow, sum and the
other precision-sensitive ops run in float32 (so a post-LN BERT's residual stream is float32).
:class:`MetaAutocast` is a ``TorchFunctionMode`` that casts the arguments of those functions as
CUDA autocast does (the op lists of the PyTorch AMP documentation, "CUDA Ops that can autocast to
float16" and "... to float32"). Autocast's bf16 copies of float32 weights are recorded apart:
they are per step, not per sequence, and the planner counts them with the weights.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

# function names (torch.*, torch.nn.functional.*, Tensor methods) by autocast's CUDA policy
LOWER = {
    "linear", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "baddbmm", "addbmm", "addmv", "addr",
    "mv", "chain_matmul", "multi_dot", "conv1d", "conv2d", "conv3d", "prelu", "scaled_dot_product_attention",
}  # fmt: skip
FLOAT32 = {
    "layer_norm", "group_norm", "softmax", "log_softmax", "softmin", "softplus", "cross_entropy", "nll_loss",
    "pow", "__pow__", "__rpow__", "rsqrt", "reciprocal", "exp", "expm1", "log", "log1p", "log2", "log10",
    "sum", "prod", "cumsum", "cumprod", "norm", "normalize", "cosine_similarity", "cdist", "mse_loss",
    "__rtruediv__", "__rdiv__", "acos", "asin", "cosh", "sinh", "tan", "erfinv", "kl_div",
}  # fmt: skip


class MetaAutocast(TorchFunctionMode):
    """Cast the floating-point tensor arguments of autocast-listed functions, as CUDA autocast does.

    Args:
        dtype: The lower precision (``torch.bfloat16`` or ``torch.float16``).

    Attributes:
        weight_copies: The casts of parameters (autocast's weight cache), kept apart from activations.
    """

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.weight_copies: list[torch.Tensor] = []

    def _cast(self, value, dtype):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
            cast = value.to(dtype)
            if isinstance(value, torch.nn.Parameter):
                self.weight_copies.append(cast)
            return cast
        if isinstance(value, (list, tuple)):
            return type(value)(self._cast(v, dtype) for v in value)
        return value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        dtype = self.dtype if name in LOWER else torch.float32 if name in FLOAT32 else None
        if dtype is not None:
            args = tuple(self._cast(a, dtype) for a in args)
            kwargs = {k: self._cast(v, dtype) for k, v in kwargs.items()}
        return func(*args, **kwargs)

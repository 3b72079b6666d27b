"""Sparse modules: inference layers whose weights are stored in sparse formats, and their registry.

    base             SparseModule, the registry (register_sparse_module) and shared state helpers
    sparse24_module  the one-copy state of a 2:4 layer (compressed on a GPU, dense on the CPU)
    linear           SparseLinear (2:4 nn.Linear)
    conv             SparseConv2d (2:4 nn.Conv2d)
    blocksparse      BlockSparseLinear (block-sparse nn.Linear)
    conv1d           SparseConv1D (2:4 transformers Conv1D, GPT-2's projections; transformers is not imported)
    walk             finding and replacing modules inside a model (used by swap and checkpoints)

Importing this package registers the built-in modules; it does not import Triton.
"""
from .base import (
    SparseModule,
    register_sparse_module,
    sparse_module_class,
    sparse_module_types,
    sparse_patterns,
    unregister_sparse_module,
)
from .linear import SparseLinear  # noqa: I001  (registration order: 2:4 is tried before block for pattern="any")
from .conv import SparseConv2d
from .blocksparse import BlockSparseLinear
from .conv1d import SparseConv1D

__all__ = [
    "SparseModule",
    "register_sparse_module",
    "unregister_sparse_module",
    "sparse_module_class",
    "sparse_module_types",
    "sparse_patterns",
    "SparseLinear",
    "SparseConv2d",
    "BlockSparseLinear",
    "SparseConv1D",
]

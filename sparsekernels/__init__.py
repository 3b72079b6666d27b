"""sparsekernels: sparse inference for PyTorch.

Importing the package is cheap: no CUDA initialisation, no Triton import. Every public name is
resolved lazily from the submodule that defines it (see ``_EXPORTS``).

Layout (data flows one way)::

    sparsekernels.nn       modules (SparseLinear, SparseConv2d, ...), whole-model swap, tuning
    sparsekernels.ops      one file per kernel: Triton kernel + launcher + torch.library op + reference
    sparsekernels.formats  compressed weight layouts (2:4 packing, block-sparse tiles)
"""
from __future__ import annotations

import importlib

from ._version import __version__

# public name -> submodule that defines it
_EXPORTS = {
    # formats
    "compress_24": "sparsekernels.formats.sparse24",
    "Sparse24Weight": "sparsekernels.formats.sparse24",
    "is_24_sparse": "sparsekernels.formats.sparse24",
    "compress_blocks": "sparsekernels.formats.blocksparse",
    "BlockSparseWeight": "sparsekernels.formats.blocksparse",
    # ops
    "sparse24_linear": "sparsekernels.ops.sparse24_linear",
    "sparse24_conv2d": "sparsekernels.ops.sparse24_conv2d",
    "block_sparse_linear": "sparsekernels.ops.blocksparse_linear",
    # modules
    "SparseLinear": "sparsekernels.nn.linear",
    "SparseConv2d": "sparsekernels.nn.conv",
    "BlockSparseLinear": "sparsekernels.nn.blocksparse",
    "sparsify": "sparsekernels.nn.swap",
    "densify": "sparsekernels.nn.swap",
    "SwapReport": "sparsekernels.nn.swap",
    # dispatcher / tuning
    "tune": "sparsekernels.nn.tuning",
    "explain": "sparsekernels.nn.tuning",
    # checkpoints
    "save_sparse": "sparsekernels.checkpoint",
    "load_sparse": "sparsekernels.checkpoint",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sparsekernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)

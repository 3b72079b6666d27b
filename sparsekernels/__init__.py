"""sparsekernels: sparse inference for PyTorch.

Importing the package is cheap: no CUDA initialisation, no Triton import. Every public name is
resolved lazily from the submodule that defines it (see ``_EXPORTS``).

Layers (each imports only the ones below it; ``docs/architecture.md`` has the picture)::

    sparsekernels.app, .benchmarks, .examples   the jobs behind the CLI: demo, prune, benchmarks
    sparsekernels.swap, .checkpoint, .tuning    whole-model swap, compressed checkpoints, tune / explain
    sparsekernels.nn                            sparse modules (SparseLinear, ...) and their registry
    sparsekernels.ops                           kernels, the routing of backends, the dispatcher
    sparsekernels.formats                       compressed weight layouts (2:4 packing, block-sparse tiles)
    sparsekernels.timing, .environment, .tables timers, environment stamps, text tables
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
    "sparse24_linear": "sparsekernels.ops.functional",
    "sparse24_conv2d": "sparsekernels.ops.functional",
    "block_sparse_linear": "sparsekernels.ops.functional",
    # modules
    "SparseLinear": "sparsekernels.nn.linear",
    "SparseConv2d": "sparsekernels.nn.conv",
    "BlockSparseLinear": "sparsekernels.nn.blocksparse",
    "SparseConv1D": "sparsekernels.nn.conv1d",
    "SparseModule": "sparsekernels.nn.base",
    "register_sparse_module": "sparsekernels.nn.base",
    "sparsify": "sparsekernels.swap",
    "densify": "sparsekernels.swap",
    "SwapReport": "sparsekernels.swap",
    # dispatcher / tuning
    "tune": "sparsekernels.tuning",
    "explain": "sparsekernels.tuning",
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

"""Ops: the kernels and what chooses among them.

    functional          the public ops (sparse24_linear, sparse24_conv2d, block_sparse_linear): check, route, call
    checks              each op's input contract, the same for every backend
    routing             the one place that chooses a backend (the table of candidates per op)
    dispatch            measures candidates on a GPU and caches the decisions (tuning cache)
    cache               dense / cuSPARSELt copies derived from a compressed weight, kept while it lives
    sparse24_linear     } one file per op: the Triton kernel, its launcher, the pure-PyTorch reference and
    sparse24_conv2d     } the torch.library registration; they import Triton, so they are imported on the
    blocksparse_linear  } first call of their op
"""

"""Kernels. One file per op: the Triton kernel, its launcher, its ``torch.library`` registration in the
``sparsekernels::`` namespace with a fake implementation, and a pure-PyTorch reference beside it."""

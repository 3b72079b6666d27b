"""Every benchmark of the project, its report writers and the README generator: what ``sparsekernels bench``,
the pytest-benchmark files in ``benchmarks/`` and ``python -m sparsekernels.benchmarks.<module>`` run.
Results land under ``benchmarks/results/<device>/``.

Modules:
    report           report writers: JSON (the data) + Markdown (the table) + PNG plots, with the environment stamp
    measure          MACs, non-zero parameters, stored and resident bytes, interleaved timing, GPU rooflines
    kernels          the 2:4 Linear sweep (ours vs dense vs cuSPARSELt) and the CPU design study
    layers           the per-layer suite: ResNet-50 convs, BERT-base / LLaMA Linears, dense vs every backend
    models           the model suites: ResNet-50, a BERT-base encoder, LLaMA-sized projections
    gpu_suite        one command that refreshes every important GPU number within a time budget
    cpu_memory       resident memory and latency of a CPU 2:4 SparseLinear against nn.Linear
    channel_latency  filter-pruned ResNet-50 at 2x fewer MACs against dense
    pruning_quality  accuracy and output fidelity of 2:4 pruning per importance criterion
    nm_quality       one-shot 2:4 quality of every criterion with and without channel permutation
    cpu_auto         the CPU design study behind backend="auto" for SparseConv2d and BlockSparseLinear
    readme           regenerates the README's results section (``python -m sparsekernels.benchmarks.readme``)
    run              what ``sparsekernels bench <selection>`` runs

An application-level package, like :mod:`sparsekernels.app`: it may import ``pruning``, only inside functions,
and nothing in the runtime imports it. This file imports nothing, so the CLI can read :data:`SELECTIONS`
without loading a benchmark.
"""

# The selections of ``sparsekernels bench`` (see :mod:`sparsekernels.benchmarks.run`).
SELECTIONS = ("kernels", "layers", "models", "all", "gpu", "memory", "channel-latency", "pruning-quality", "nm-quality",
              "llm-scaling", "decode", "cpu-auto")

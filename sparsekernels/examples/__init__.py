"""Example data and models for the demo, the benchmarks and the accuracy tests -- not part of the runtime.

Modules:
    digits   scikit-learn's bundled handwritten digits and a small BatchNorm CNN (``DigitsCNN``) to train on them

Nothing in the runtime (``sparsekernels.formats``, ``.ops``, ``.nn``, ``.swap``) imports this package.
"""

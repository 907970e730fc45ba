"""pytest-benchmark suite, FLOP accounting and the results report (see benchmarks/results/README.md)."""

"""The quality benchmark's parts (scripts/bench_quality.py, scripts/evaluate.py): capabilities,
lm-evaluation-harness tasks, statistics, plots."""

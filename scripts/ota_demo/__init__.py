"""The SmolLM2-135M demo: base preparation, capability data, evaluation (used by `make demo`)."""

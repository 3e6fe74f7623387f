"""Command-line entry points (thin: parse, validate, call the library)."""

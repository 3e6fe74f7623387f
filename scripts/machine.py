"""What the benchmarks state beside every figure: the CPU model and its widest vector extension."""

from __future__ import annotations


def cpu_description() -> str:
    """e.g. "AMD EPYC, AVX2" (from /proc/cpuinfo; "unknown" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return "unknown"
    name = next(
        (line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "unknown"
    )
    return f"{name}, {'AVX-512' if 'avx512f' in text else 'AVX2' if 'avx2' in text else 'no AVX2'}"

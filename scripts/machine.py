"""What the benchmarks state beside every figure: the CPU model and its widest vector extension."""

from __future__ import annotations

import glob


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


def free_page_reporting() -> bool:
    """Whether this is a VM whose freed memory goes back to its host (virtio-balloon's free page
    reporting, feature bit 5): memory first touched after a few idle seconds then costs a host
    fault per page, which the merge benchmark's ``--settle`` measures."""
    for path in glob.glob("/sys/bus/virtio/drivers/virtio_balloon/virtio*/features"):
        try:
            with open(path) as f:
                bits = f.read().strip()
        except OSError:
            continue
        if len(bits) > 5 and bits[5] == "1":
            return True
    return False

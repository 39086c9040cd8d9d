"""The machine a benchmark ran on, written beside its figures: CPU model, vector units, cores, date.

Figures differ between the machines this project runs on (an Intel Xeon with AVX-512 and AMX, an AMD EPYC with
AVX2 and FMA only), so every result file and table says which one it came from.
"""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

# The vector units that set a CPU's float32 throughput, widest first (flag names as /proc/cpuinfo has them).
VECTOR_UNITS = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("fma", "FMA"), ("amx_tile", "AMX"), ("amx_bf16", "AMX-BF16"))


def cpu_flags() -> tuple[str, set[str]]:
    """(model name, flags) from /proc/cpuinfo; the platform's processor string and no flags elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return platform.processor() or "unknown", set()
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    return fields.get("model name", "unknown"), set(fields.get("flags", "").split())


def machine() -> dict:
    """{"cpu", "vector_units", "cores", "date"} of this machine."""
    model, flags = cpu_flags()
    units = [name for flag, name in VECTOR_UNITS if flag in flags]
    return {
        "cpu": model,
        "vector_units": ", ".join(units) or "unknown",
        "cores": os.cpu_count(),
        "date": datetime.date.today().isoformat(),
    }


def describe(info: dict) -> str:
    """One line for a report: "AMD EPYC (AVX2, FMA), 2 cores, 2026-11-29"."""
    return f"{info['cpu']} ({info['vector_units']}), {info['cores']} cores, {info['date']}"

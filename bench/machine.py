"""The machine a benchmark ran on, written beside its figures: CPU model, vector units, cores, date; and its
float32 roofs for model-FLOPs utilisation: the nominal peak from its vector units, and a measured matmul rate.

Figures differ between the machines this project runs on (an Intel Xeon with AVX-512 and AMX, an AMD EPYC with
AVX2 and FMA only, an AMD EPYC with AVX-512), so every result file and table says which one it came from.

Run: `python -m bench.machine` prints both roofs here.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from pathlib import Path

# The vector units that set a CPU's float32 throughput, widest first (flag names as /proc/cpuinfo has them).
VECTOR_UNITS = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("fma", "FMA"), ("amx_tile", "AMX"), ("amx_bf16", "AMX-BF16"))


# AMD family 25 is Zen 3 and Zen 4: Zen 4 runs AVX-512 instructions on 256-bit FMA pipes (two per core), so its
# float32 peak is AVX2's; family 26 (Zen 5) has 512-bit pipes.
AMD_FULL_WIDTH_AVX512_FAMILY = 26


def cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return {}
    first = text.split("\n\n", 1)[0]
    return {
        key.strip(): value.strip() for key, value in (line.split(":", 1) for line in first.splitlines() if ":" in line)
    }


def cpu_flags() -> tuple[str, set[str]]:
    """(model name, flags) from /proc/cpuinfo; the platform's processor string and no flags elsewhere."""
    fields = cpuinfo()
    return fields.get("model name", platform.processor() or "unknown"), set(fields.get("flags", "").split())


def fp32_flops_per_cycle(fields: dict[str, str]) -> tuple[int, str]:
    """Float32 FLOPs one core can start per cycle, and why: FMA units x lanes x 2 (multiply and add).

    /proc/cpuinfo names the instruction sets, not how many FMA units run them, so the count is the usual one
    for server parts: two per core (Intel Xeon Gold/Platinum, AMD Zen). A Xeon with one 512-bit unit (some
    Silver and Bronze parts) would be over-estimated by 2x; the measured matmul rate beside it shows that."""
    flags = set(fields.get("flags", "").split())
    amd = fields.get("vendor_id") == "AuthenticAMD"
    if "avx512f" in flags and not (amd and int(fields.get("cpu family", 0)) < AMD_FULL_WIDTH_AVX512_FAMILY):
        return 64, "AVX-512: 2 FMA units x 16 float32 lanes x 2"
    if "avx512f" in flags:
        return 32, "AVX-512 on 256-bit pipes (AMD Zen 4): 2 FMA units x 8 float32 lanes x 2"
    if "fma" in flags and "avx2" in flags:
        return 32, "AVX2 + FMA: 2 FMA units x 8 float32 lanes x 2"
    if "avx" in flags:
        return 16, "AVX without FMA: an 8-lane add and an 8-lane multiply"
    return 8, "SSE: a 4-lane add and a 4-lane multiply"


def nominal_peak() -> dict:
    """{"cores", "clock_ghz", "flops_per_cycle_per_core", "why", "peak_gflops"}: this CPU's float32 peak.

    The clock is /proc/cpuinfo's "cpu MHz" (under a hypervisor, the nominal clock, without turbo); cores are the
    threads torch uses, as the benchmarks run with one thread per core."""
    import torch

    fields = cpuinfo()
    per_cycle, why = fp32_flops_per_cycle(fields)
    clock_ghz = float(fields["cpu MHz"]) / 1e3 if "cpu MHz" in fields else None
    cores = torch.get_num_threads()
    return {
        "cores": cores,
        "clock_ghz": round(clock_ghz, 2) if clock_ghz else None,
        "flops_per_cycle_per_core": per_cycle,
        "why": why,
        "peak_gflops": round(cores * clock_ghz * per_cycle, 1) if clock_ghz else None,
    }


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of `repeats` float32 size x size matmuls on all of torch's threads (the practical roof)."""
    import torch

    a = torch.randn(size, size)
    torch.mm(a, a)  # warm-up: thread pool and caches
    started = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, a)
    return repeats * 2 * size**3 / (time.perf_counter() - started) / 1e9


def roof_summary(samples: list[float]) -> dict:
    """Median, min and max of measured matmul rates (GFLOP/s): it moves from run to run on shared machines."""
    return {
        "samples": [round(s, 1) for s in samples],
        "median": round(statistics.median(samples), 1),
        "min": round(min(samples), 1),
        "max": round(max(samples), 1),
    }


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


if __name__ == "__main__":
    peak = nominal_peak()
    print(describe(machine()))
    print(f"nominal float32 peak: {peak['peak_gflops']} GFLOP/s = {peak['cores']} cores x {peak['clock_ghz']} GHz x "
          f"{peak['flops_per_cycle_per_core']} FLOPs/cycle ({peak['why']})")  # fmt: skip
    roof = roof_summary([matmul_gflops() for _ in range(5)])
    print(f"2048^2 float32 matmul: median {roof['median']} GFLOP/s (min {roof['min']}, max {roof['max']}, 5 samples)")

"""`peftplan gpus`: the GPU catalog (peftplan/catalog/gpus.json) as a table."""

from __future__ import annotations

from .common import _guard


def gpus() -> None:
    """List the GPU catalog."""

    def run() -> None:
        from rich.console import Console
        from rich.table import Table

        from ..catalog import gpu_catalog
        from ..units import fmt_gib

        table = Table(title="GPUs (dense peak throughput; sources in peftplan/catalog/gpus.json)")
        for col in ("name", "GPU", "memory", "bf16", "bf16/fp16 TFLOPS", "fp32 TFLOPS", "bandwidth GB/s"):
            table.add_column(col)
        for g in gpu_catalog().values():
            half = g.peak_flops.get("bf16") or g.peak_flops.get("fp16")
            table.add_row(g.name, g.full_name, fmt_gib(g.memory_bytes), "yes" if g.bf16_supported else "no",
                          f"{half / 1e12:.0f}" if half else "n/a",
                          f"{g.peak_flops['fp32'] / 1e12:.1f}" if g.peak_flops.get("fp32") else "n/a",
                          f"{g.memory_bandwidth_bytes_per_s / 1e9:.0f}")
        Console().print(table)

    _guard(run)

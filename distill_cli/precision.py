"""Which precision a run trains in: fp16 + grad scaler on GPU (as ultralytics), bf16 on CPUs with native bf16."""

from __future__ import annotations

from dataclasses import replace

import torch

from .config import RunConfig


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): there bf16 autocast is ~1.6x faster."""
    return any(
        getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )


def resolve_precision(cfg: RunConfig, device: torch.device) -> RunConfig:
    """``amp_dtype`` made concrete (fp16, bf16 or fp32), so that config.yaml says it and a resumed run keeps it.

    ``auto``: fp16 with a grad scaler on GPU, as ultralytics trains (bf16 rounds the box decode ~8x more:
    benchmarks/precision.py); bf16 on a CPU with native bf16 (AVX512-BF16/AMX), ~1.6x faster there; fp32 on other
    CPUs. ``fp16`` / ``bf16`` force one; ``--no-amp`` means fp32.
    """
    if not cfg.amp:
        choice = "fp32"
    elif cfg.amp_dtype != "auto":
        choice = cfg.amp_dtype
    elif device.type == "cuda":
        choice = "fp16"
    else:
        choice = "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"
    return replace(cfg, amp_dtype=choice)


def amp_dtypes(cfg: RunConfig, device: torch.device) -> tuple[torch.dtype | None, torch.dtype]:
    """(student autocast dtype or None, teacher dtype): the same low precision for both, or fp32."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(resolve_precision(cfg, device).amp_dtype)
    return (dtype, dtype) if dtype else (None, torch.float32)


def precision_note(amp_dtype: torch.dtype | None, teacher_dtype: torch.dtype, device: torch.device) -> str:
    """One line for start-up: which precision this run chose, and why."""
    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    student = f"{names[amp_dtype]} autocast" if amp_dtype else "fp32"
    scaler = " + grad scaler" if amp_dtype == torch.float16 else ""
    why = "" if amp_dtype or device.type != "cpu" else " (this CPU has no native bf16, or --no-amp)"
    return f"precision: student {student}{scaler}, teacher {names[teacher_dtype]} Conv+BN-fused{why}"

"""Built-in device profiles: what each device runs well, its limits and its objective."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024


@dataclass(frozen=True)
class BuiltinProfile:
    name: str
    quantization: str  # preferred: the tie-breaker when measured latencies are within noise
    quantizations: tuple[str, ...]  # what auto may choose from
    threads: int
    description: str
    objective: str = "latency"  # or "size" for storage-bound devices
    accuracy_budget: float = 0.01
    max_model_bytes: int | None = None
    max_ram_bytes: int | None = None
    recipe: str = "auto"


ALL_QUANTIZATIONS = ("int8", "dynamic_range", "float16", "float32")

BUILTIN_PROFILES: tuple[BuiltinProfile, ...] = (
    BuiltinProfile("rpi4", "int8", ALL_QUANTIZATIONS, 4, "Raspberry Pi 4 (Cortex-A72): full int8 preferred",
                   max_model_bytes=256 * MiB, max_ram_bytes=1024 * MiB),
    BuiltinProfile("rpi5", "int8", ALL_QUANTIZATIONS, 4, "Raspberry Pi 5 (Cortex-A76): full int8 preferred",
                   max_model_bytes=512 * MiB, max_ram_bytes=2048 * MiB),
    BuiltinProfile("rpi-zero2", "int8", ("int8", "dynamic_range"), 4,
                   "Raspberry Pi Zero 2 W (512 MB RAM, SD card): smallest model wins", objective="size",
                   accuracy_budget=0.02, max_model_bytes=16 * MiB, max_ram_bytes=256 * MiB),
    BuiltinProfile("jetson-nano", "float16", ("float16", "float32"), 4,
                   "Jetson Nano (Cortex-A57, Maxwell GPU): float16 for the GPU path",
                   max_model_bytes=512 * MiB, max_ram_bytes=2048 * MiB),
    BuiltinProfile("jetson-orin", "float16", ("float16", "int8", "float32"), 6,
                   "Jetson Orin (Cortex-A78AE, Ampere GPU): float16 or int8",
                   max_model_bytes=2048 * MiB, max_ram_bytes=8192 * MiB),
    BuiltinProfile("x86-64", "dynamic_range", ALL_QUANTIZATIONS, 2, "generic x86-64: measured choice"),
    BuiltinProfile("arm64", "int8", ALL_QUANTIZATIONS, 4, "generic arm64 (aarch64): full int8 preferred"),
)

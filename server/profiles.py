"""Built-in device profiles and what each one's recipe builds."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BuiltinProfile:
    name: str
    quantization: str
    threads: int
    description: str


BUILTIN_PROFILES: tuple[BuiltinProfile, ...] = (
    BuiltinProfile("rpi4", "int8", 4, "Raspberry Pi 4 (Cortex-A72): full int8"),
    BuiltinProfile("rpi5", "int8", 4, "Raspberry Pi 5 (Cortex-A76): full int8"),
    BuiltinProfile("jetson-nano", "float16", 4, "Jetson Nano (Cortex-A57, Maxwell GPU): float16"),
    BuiltinProfile("jetson-orin", "float16", 6, "Jetson Orin (Cortex-A78AE, Ampere GPU): float16"),
    BuiltinProfile("x86-64", "dynamic_range", 2, "generic x86-64: dynamic-range int8 weights"),
    BuiltinProfile("arm64", "int8", 4, "generic arm64 (aarch64): full int8"),
)

"""The quantization schemes a model can be compressed with.

Values are persisted (variant records, manifests) and never renamed.
"""

from __future__ import annotations

import enum

from shared.errors import UserInputError


class Quantization(enum.Enum):
    FLOAT32 = "float32"
    """No quantization: the float model as a TFLite flatbuffer."""
    DYNAMIC_RANGE = "dynamic_range"
    """int8 weights, float activations; needs no representative data."""
    FLOAT16 = "float16"
    """float16 weights, dequantized to float32 on CPU."""
    INT8 = "int8"
    """Full integer: int8 weights and activations, int8 input and output."""
    INT8_FLOAT_IO = "int8_float_io"
    """Full integer inside, float input and output (quantize/dequantize ops at the edges)."""
    INT16X8 = "int16x8"
    """int8 weights with int16 activations: closer to float accuracy than int8; float input and output."""
    PREBUILT = "prebuilt"
    """A .tflite the user supplied: evaluated and signed, shipped as it is, never converted again."""

    @classmethod
    def convertible(cls) -> tuple[Quantization, ...]:
        """The schemes a model can be converted with (all but PREBUILT)."""
        return tuple(q for q in cls if q is not cls.PREBUILT)

    @property
    def needs_representative_data(self) -> bool:
        return self in (Quantization.INT8, Quantization.INT8_FLOAT_IO, Quantization.INT16X8)

    @classmethod
    def parse(cls, text: str) -> Quantization:
        """The member named ``text`` (its value), or a ``UserInputError`` listing the choices."""
        try:
            return cls(text.strip().lower())
        except ValueError as exc:
            choices = ", ".join(q.value for q in cls)
            raise UserInputError(f"unknown quantization {text!r}; choose one of: {choices}") from exc

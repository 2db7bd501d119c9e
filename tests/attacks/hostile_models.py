"""Real model files for the hostile-model attacks: two good classifiers and five that must never be served.

Built once per session with TensorFlow (the agent never imports it): the good
ones and the eval set are ``tests/agent/serving_material.py``'s; the hostile
ones are real flatbuffers (a 4 GiB intermediate tensor, an unregistered
custom op, a loop that runs for hours) or real bytes that are not a model
(truncated, random).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.agent.material import payload
from tests.agent.serving_material import CLASSES, FEATURES, build_served_models


@dataclass(frozen=True)
class ModelFiles:
    good_v1: bytes
    good_v2: bytes
    eval_set: bytes  # npz: float32 x (4 features), int64 y (3 classes)
    truncated: bytes  # good_v1 cut in half
    random: bytes  # bytes of the same size that are not a flatbuffer
    huge_tensor: bytes  # a 4 GiB intermediate tensor
    custom_op: bytes  # an op no runtime registers
    hanging: bytes  # a WHILE loop of two billion steps


def _convert(function: Any, *, custom_ops: bool = False) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_concrete_functions([function.get_concrete_function()], function)
    converter.allow_custom_ops = custom_ops
    return bytes(converter.convert())


def tile_flatbuffer(tensor_mib: int) -> bytes:
    """A tiny file whose graph asks for an intermediate tensor of ``tensor_mib`` MiB (a tile of its input),
    and as much again for its reshape."""
    import tensorflow as tf

    repeats = tensor_mib * 1024 * 1024 // (4 * FEATURES)  # float32

    @tf.function(input_signature=[tf.TensorSpec([1, FEATURES], tf.float32)])
    def tile(x: Any) -> Any:
        big = tf.tile(x, [1, repeats])
        return tf.reduce_sum(tf.reshape(big, [1, -1, FEATURES]), axis=1)[:, :CLASSES]

    return _convert(tile)


def huge_tensor_flatbuffer() -> bytes:
    """A 4 GiB intermediate tensor: more than any trial may use."""
    return tile_flatbuffer(4096)


def custom_op_flatbuffer() -> bytes:
    """A model whose first op is ``Erfinv``, which TFLite has no builtin for: converted as a custom op
    that no runtime registers."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([1, FEATURES], tf.float32)])
    def custom(x: Any) -> Any:
        return tf.nn.softmax(tf.raw_ops.Erfinv(x=x)[:, :CLASSES])

    return _convert(custom, custom_ops=True)


def hanging_flatbuffer() -> bytes:
    """A model whose one invoke runs a loop of two billion steps: hours, on any device."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([1, FEATURES], tf.float32)])
    def spin(x: Any) -> Any:
        def more(i: Any, y: Any) -> Any:
            return i < 2_000_000_000

        def step(i: Any, y: Any) -> Any:
            return i + 1, y * 1.0000001

        _, y = tf.while_loop(more, step, [tf.constant(0), x])
        return tf.nn.softmax(y[:, :CLASSES])

    return _convert(spin)


def build_model_files(directory: Path) -> ModelFiles:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    served = build_served_models(directory)
    good_v1 = served.v1.read_bytes()
    return ModelFiles(
        good_v1=good_v1,
        good_v2=served.v2.read_bytes(),
        eval_set=served.eval_path.read_bytes(),
        truncated=good_v1[: len(good_v1) // 2],
        random=payload("not a model", len(good_v1)),
        huge_tensor=huge_tensor_flatbuffer(),
        custom_op=custom_op_flatbuffer(),
        hanging=hanging_flatbuffer(),
    )

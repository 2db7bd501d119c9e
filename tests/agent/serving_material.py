"""Real small models for the serving tests: two tiny Keras classifiers converted to .tflite once per session.

4 float features in, 3 softmax outputs; v1 and v2 differ in their weights, so every answer says which
model computed it. The eval set is written as the server writes it (npz with float32 ``x`` and int ``y``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.serving.host import ModelSource

FEATURES, CLASSES, EVAL_SAMPLES = 4, 3, 40


@dataclass(frozen=True)
class ServedModels:
    v1: Path
    v2: Path
    eval_path: Path

    def source(self, version: int = 1, *, threads: int = 1, deployment_id: str = "") -> ModelSource:
        path = self.v1 if version == 1 else self.v2
        return ModelSource(model="clf", version=version, sha256=f"sha-{version}", quantization="float32",
                           deployment_id=deployment_id or f"dep-{version}", model_path=str(path),
                           eval_path=str(self.eval_path), threads=threads)


def build_served_models(directory: Path) -> ServedModels:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    paths = []
    for seed in (1, 2):
        tf.keras.utils.set_random_seed(seed)
        model = tf.keras.Sequential([
            tf.keras.Input(shape=(FEATURES,)),
            tf.keras.layers.Dense(8, activation="relu"),
            tf.keras.layers.Dense(CLASSES, activation="softmax"),
        ])
        path = directory / f"clf-v{seed}.tflite"
        path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
        paths.append(path)
    rng = np.random.default_rng(0)
    eval_path = directory / "eval.npz"
    np.savez(eval_path, x=rng.random((EVAL_SAMPLES, FEATURES), dtype=np.float32),
             y=(np.arange(EVAL_SAMPLES) % CLASSES).astype(np.int64))
    return ServedModels(paths[0], paths[1], eval_path)


def direct_outputs(path: Path, batch: Any) -> Any:
    """What the interpreter itself computes for each sample of ``batch``, without the agent."""
    from shared.interpreter import TFLiteModel

    model = TFLiteModel(str(path))
    try:
        return np.stack([np.asarray(model.infer(sample[np.newaxis, ...]))[0] for sample in batch])
    finally:
        model.close()

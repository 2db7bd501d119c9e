"""The demo model: a small CNN on scikit-learn's bundled 8x8 digits.

Nothing is downloaded: ``sklearn.datasets.load_digits`` ships with
scikit-learn. Inputs are ``(8, 8, 1)`` float32 in ``[0, 1]``, 10 classes.
``train_digits_cnn`` reaches about 0.98 test accuracy in a few seconds on two
CPU cores; ``train_weak_digits_model`` is deliberately under-trained, for
tests that need a variant to fail an accuracy gate. Everything is seeded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from server.compress.convert import import_keras
from server.compress.evalset import EvalSet, write_eval_file
from shared.errors import StorageError

DIGITS_INPUT_SHAPE = (8, 8, 1)
DIGITS_CLASSES = 10
DEFAULT_EPOCHS = 15
TEST_FRACTION = 0.25
DEMO_MODEL_NAME = "digits.keras"
DEMO_EVAL_NAME = "digits-eval.npz"


def digits_split(seed: int = 0) -> tuple[EvalSet, EvalSet]:
    """``(train, test)`` of the 1,797 digits, stratified, ``TEST_FRACTION`` held out."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[..., np.newaxis]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=TEST_FRACTION, random_state=seed, stratify=y)
    return EvalSet(x=x_train, y=y_train), EvalSet(x=x_test, y=y_test)


def build_digits_cnn(seed: int = 0) -> Any:
    """The untrained CNN (about 43k parameters), compiled with Adam."""
    keras = import_keras()
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input(shape=DIGITS_INPUT_SHAPE, name="pixels"),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(DIGITS_CLASSES, activation="softmax", name="scores"),
        ],
        name="digits_cnn",
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=2e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def build_digits_resnet(seed: int = 0, width: int = 48, blocks: int = 2) -> Any:
    """A small residual net on the same digits (about 85k parameters at width 48), compiled with Adam.

    A stem convolution, then ``blocks`` residual blocks (convolution, batch norm, ReLU, convolution, batch
    norm, added to the block's input, ReLU), global average pooling and two Dense layers: the shape of the
    ResNets users bring, small enough to train in seconds. Batch norm uses momentum 0.9: with Keras' 0.99
    its moving statistics lag the weights of so short a training, and the net predicts by chance outside it."""
    keras = import_keras()
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    pixels = keras.Input(shape=DIGITS_INPUT_SHAPE, name="pixels")
    x = layers.ReLU(name="stem_relu")(layers.BatchNormalization(momentum=0.9, name="stem_bn")(
        layers.Conv2D(width, 3, padding="same", use_bias=False, name="stem_conv")(pixels)))
    for b in range(blocks):
        y = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"block{b}_conv1")(x)
        y = layers.ReLU(name=f"block{b}_relu1")(layers.BatchNormalization(momentum=0.9, name=f"block{b}_bn1")(y))
        y = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"block{b}_conv2")(y)
        y = layers.BatchNormalization(momentum=0.9, name=f"block{b}_bn2")(y)
        x = layers.ReLU(name=f"block{b}_out")(layers.Add(name=f"block{b}_add")([x, y]))
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dense(64, activation="relu", name="hidden")(x)
    scores = layers.Dense(DIGITS_CLASSES, activation="softmax", name="scores")(x)
    model = keras.Model(pixels, scores, name="digits_resnet")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=2e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def train_digits_cnn(epochs: int = DEFAULT_EPOCHS, seed: int = 0) -> tuple[Any, EvalSet]:
    """A trained digits CNN and the held-out test set it was not trained on."""
    train, test = digits_split(seed)
    model = build_digits_cnn(seed)
    model.fit(train.x, train.y, epochs=epochs, batch_size=32, shuffle=True, verbose=0)
    return model, test


def train_digits_resnet(epochs: int = DEFAULT_EPOCHS, seed: int = 0) -> tuple[Any, EvalSet]:
    """A trained residual digits net and the held-out test set."""
    train, test = digits_split(seed)
    model = build_digits_resnet(seed)
    model.fit(train.x, train.y, epochs=epochs, batch_size=32, shuffle=True, verbose=0)
    return model, test


def train_weak_digits_model(train_samples: int = 60, epochs: int = 1, seed: int = 0) -> tuple[Any, EvalSet]:
    """The same CNN trained on a few samples for one epoch: far below 0.9 test accuracy."""
    train, test = digits_split(seed)
    model = build_digits_cnn(seed)
    model.fit(train.x[:train_samples], train.y[:train_samples], epochs=epochs, batch_size=32, verbose=0)
    return model, test


def write_demo_inputs(
    out_dir: str | os.PathLike[str], *, epochs: int = DEFAULT_EPOCHS, seed: int = 0
) -> tuple[Path, Path]:
    """Train the CNN and write ``digits.keras`` and ``digits-eval.npz`` (the test split) to ``out_dir``."""
    model, test = train_digits_cnn(epochs=epochs, seed=seed)
    out = Path(out_dir)
    model_path = out / DEMO_MODEL_NAME
    try:
        out.mkdir(parents=True, exist_ok=True)
        model.save(model_path)
    except OSError as exc:
        raise StorageError(f"cannot write the demo model to {model_path}: {exc.strerror or exc}") from exc
    eval_path = write_eval_file(test, out / DEMO_EVAL_NAME)
    return model_path, eval_path

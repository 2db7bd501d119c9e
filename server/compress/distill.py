"""Knowledge distillation: a trained teacher teaches a smaller student.

``width_scaled_student`` makes the usual student, the teacher's own
architecture with fewer filters and units, rebuilt from the teacher's config
with fresh weights. ``distill`` trains a student on

    alpha * CE(labels, student) + (1 - alpha) * T^2 * KL(softmax(t / T) || softmax(s / T))

where ``t`` and ``s`` are the teacher's and the student's logits (Hinton et
al., 2015; the T^2 keeps the soft term's gradients on the scale of the hard
term's as T changes). The student is trained in place and comes back as a
plain Keras model that saves and converts like any other.

The teacher is frozen by construction: its logits are computed once, in
inference mode, before training, and travel with the labels as the target.
There is no data augmentation here, so the teacher would see exactly the same
samples every epoch; running it once is the same loss at a fraction of the
cost, and the teacher's variables never enter the training step.

Keras is imported lazily through ``server.compress.convert``.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.compress.convert import import_keras, model_signature, predict_accuracy
from server.compress.evalset import EvalSet, check_against_model
from shared.errors import UserInputError, one_line

logger = logging.getLogger(__name__)

SCALED_LAYERS = frozenset({"Conv1D", "Conv2D", "Conv3D", "SeparableConv1D", "SeparableConv2D", "Dense"})
"""Built-in layers whose width (``filters`` or ``units``) ``width_scaled_student`` scales."""

_WIDTH_KEYS = ("filters", "units")
_NESTED_MODELS = frozenset({"Sequential", "Functional", "Model"})
_PREDICT_BATCH = 256


@dataclass(frozen=True)
class DistillResult:
    model: Any
    """The trained student (the ``student`` passed in, trained in place)."""
    student_params: int
    teacher_params: int
    val_accuracy: float | None
    """Top-1 accuracy of the student on the validation set, if one was given."""
    epoch_losses: tuple[float, ...] = ()
    """The distillation loss averaged over each epoch."""


# -- which models can be rebuilt ------------------------------------------------------


def rebuildable_kind(model: Any, action: str) -> str:
    """``"sequential"`` or ``"functional"``, or ``UserInputError`` saying why ``action`` cannot rebuild ``model``.

    Rebuilding works from the model's config, so it needs a plain
    ``keras.Sequential`` or a functional ``keras.Model(inputs, outputs)``;
    a subclassed model's structure is Python code that no config describes.
    """
    keras = import_keras()
    kind = type(model)
    if kind is keras.Sequential:
        return "sequential"
    if kind.__name__ == "Functional" and kind.__module__.startswith("keras."):
        return "functional"
    if isinstance(model, keras.Model):
        raise UserInputError(
            f"cannot {action} {kind.__name__!r}: it is a subclassed Keras model, whose layers are wired in Python "
            "code; build the model with keras.Sequential or the functional API (keras.Model(inputs, outputs))"
        )
    raise UserInputError(f"cannot {action} a {kind.__name__}: expected a Keras model")


# -- the student ------------------------------------------------------------------------


def width_scaled_student(teacher: Any, width: float, *, seed: int = 0) -> Any:
    """The teacher's architecture with every conv's filters and every hidden Dense's units times ``width``.

    ``DepthwiseConv2D`` keeps its ``depth_multiplier`` (its output channels
    follow its input). The classifier, every scaled layer whose output reaches
    the model output without passing another scaled layer, keeps its size and
    activation. Weights are fresh, drawn after ``keras.utils.set_random_seed(seed)``.
    """
    keras = import_keras()
    if isinstance(width, bool) or not isinstance(width, numbers.Real) or not 0 < width <= 1:
        raise UserInputError(f"student width must be a number in (0, 1], got {width!r}")
    kind = rebuildable_kind(teacher, "build a width-scaled student of")
    config = teacher.get_config()
    layers = config["layers"]
    for entry in layers:
        if entry.get("class_name") in _NESTED_MODELS or "layers" in entry.get("config", {}):
            name = entry.get("config", {}).get("name", "?")
            raise UserInputError(
                f"cannot build a width-scaled student: layer {name!r} is a nested model; "
                "flatten it into one Sequential or functional model"
            )
    classifier = _classifier_names(config, kind)
    for entry in layers:
        entry.pop("build_config", None)  # built for the teacher's shapes; the student's layers build on first call
        layer_config = entry["config"]
        if entry["class_name"] not in SCALED_LAYERS or layer_config["name"] in classifier:
            continue
        for key in _WIDTH_KEYS:
            if key in layer_config:
                layer_config[key] = max(1, math.floor(layer_config[key] * width + 0.5))
    config["name"] = f"{teacher.name}_student"
    keras.utils.set_random_seed(seed)
    try:
        if kind == "sequential":
            student = keras.Sequential.from_config(config)
        else:
            student = keras.Model.from_config(config)
    except Exception as exc:  # Keras raises ValueError, TypeError, ... when shapes no longer fit
        raise UserInputError(
            f"cannot build a width-scaled student of {teacher.name!r} at width {width}: {one_line(exc)} "
            "(layers that fix sizes, such as Reshape or residual Adds onto the input, do not scale)"
        ) from exc
    if tuple(student.outputs[0].shape) != tuple(teacher.outputs[0].shape):
        raise UserInputError(
            f"the width-scaled student of {teacher.name!r} has output shape {tuple(student.outputs[0].shape)}, "
            f"not the teacher's {tuple(teacher.outputs[0].shape)}"
        )
    logger.debug("student of %s at width %s: %d params", teacher.name, width, student.count_params())
    return student


def _classifier_names(config: dict[str, Any], kind: str) -> set[str]:
    """Names of the scaled-type layers that set the output width: the first ones met walking back from the output."""
    layers = config["layers"]
    if kind == "sequential":
        for entry in reversed(layers):
            if entry["class_name"] in SCALED_LAYERS:
                return {entry["config"]["name"]}
        return set()
    by_name = {entry["config"]["name"]: entry for entry in layers}
    outputs = config["output_layers"]
    if outputs and isinstance(outputs[0], str):  # a single output may be stored as one [name, node, tensor]
        outputs = [outputs]
    pending = [(ref[0], ref[1]) for ref in outputs]
    seen: set[tuple[str, int]] = set()
    kept: set[str] = set()
    while pending:
        name, node_index = pending.pop()
        if (name, node_index) in seen:
            continue
        seen.add((name, node_index))
        entry = by_name[name]
        if entry["class_name"] in SCALED_LAYERS:
            kept.add(name)
            continue
        nodes = entry.get("inbound_nodes") or []
        if node_index < len(nodes):
            pending.extend((ref[0], ref[1]) for ref in _tensor_refs(nodes[node_index]))
    return kept


def _tensor_refs(node: Any) -> list[list[Any]]:
    """Every ``[layer name, node index, tensor index]`` a serialized call node takes as input."""
    if isinstance(node, dict):
        if node.get("class_name") == "__keras_tensor__":
            return [node["config"]["keras_history"]]
        return [ref for value in node.values() for ref in _tensor_refs(value)]
    if isinstance(node, (list, tuple)):
        return [ref for value in node for ref in _tensor_refs(value)]
    return []


# -- logits -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogitsView:
    """How to read a classifier's logits without changing it: ``head(features(x))``.

    Distillation needs logits, but these models end in a softmax. Taking
    ``log(probabilities)`` would be exact in theory (it differs from the
    logits by a per-sample constant, which softmax and cross-entropy ignore),
    but a float32 softmax saturates: a confident model's small probabilities
    round to 0 and their logs to -inf, and gradients through log(softmax)
    lose precision there. So the view reads the pre-activation itself,
    sharing the model's variables:

    - last layer ``Softmax`` or ``Activation("softmax")``: its input is the logits
      (``features`` is the model cut before it, ``head`` is ``None``);
    - last layer ``Dense(activation="softmax")``: ``features`` is the model cut
      before it, and ``head`` is that Dense, whose ``x @ kernel + bias`` is
      computed here without the activation;
    - last layer with a linear activation: the model already returns logits.
    """

    features: Any
    head: Any | None

    def logits(self, x: Any, *, training: bool) -> Any:
        """Symbolic/traced logits, differentiable with respect to the shared variables."""
        keras = import_keras()
        h = self.features(x, training=training)
        if self.head is None:
            return h
        z = keras.ops.matmul(h, self.head.kernel)
        return z + self.head.bias if self.head.use_bias else z

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits of ``x`` in inference mode, as float32."""
        # Called eagerly, batch by batch: Model.predict would trace a new tf.function for every view built.
        keras = import_keras()
        batches = [
            keras.ops.convert_to_numpy(self.features(x[start : start + _PREDICT_BATCH], training=False))
            for start in range(0, len(x), _PREDICT_BATCH)
        ]
        h = np.concatenate(batches).astype(np.float32, copy=False)
        if self.head is None:
            return h
        z = h @ np.asarray(self.head.kernel, dtype=np.float32)
        return z + np.asarray(self.head.bias, dtype=np.float32) if self.head.use_bias else z


def logits_view(model: Any, role: str) -> LogitsView:
    """The ``LogitsView`` of a classifier ending in a softmax (or in logits); ``UserInputError`` otherwise."""
    keras = import_keras()
    model_signature(model)  # one input, one (batch, classes) output
    final, node_index, _ = model.outputs[0]._keras_history
    node_inputs = final._inbound_nodes[node_index].input_tensors  # the call that made the output, even if shared
    config = final.get_config()
    activation = config.get("activation")
    if len(node_inputs) == 1:
        before_final = keras.Model(model.inputs[0], node_inputs[0])
        if isinstance(final, keras.layers.Softmax) and config.get("axis", -1) in (-1, 1):
            return LogitsView(before_final, None)
        if type(final) is keras.layers.Activation and activation == "softmax":
            return LogitsView(before_final, None)
        if type(final) is keras.layers.Dense and activation == "softmax" and not final.quantization_mode:
            return LogitsView(before_final, final)
    if activation == "linear":
        return LogitsView(model, None)
    raise UserInputError(
        f"the {role} {model.name!r} must end in a softmax (Dense(activation='softmax'), Softmax or "
        f"Activation('softmax')) or in plain logits; its last layer is {type(final).__name__} "
        f"{final.name!r} with activation {activation!r}"
    )


# -- distillation -------------------------------------------------------------------------


def distill(
    teacher: Any,
    student: Any,
    train: EvalSet,
    *,
    alpha: float = 0.1,
    temperature: float = 4.0,
    epochs: int = 10,
    batch_size: int = 32,
    seed: int = 0,
    validation: EvalSet | None = None,
    learning_rate: float = 2e-3,
) -> DistillResult:
    """Train ``student`` (in place) to match ``teacher`` on ``train``; see the module docstring for the loss."""
    keras = import_keras()
    if not 0.0 <= alpha <= 1.0:
        raise UserInputError(f"alpha, the weight of the hard-label loss, must be in [0, 1], got {alpha}")
    if not temperature > 0.0 or not math.isfinite(temperature):
        raise UserInputError(f"the distillation temperature must be a positive number, got {temperature}")
    for name, value in (("epochs", epochs), ("batch size", batch_size)):
        if value < 1:
            raise UserInputError(f"distillation needs a {name} of at least 1, got {value}")
    teacher_shape, teacher_classes = model_signature(teacher)
    student_shape, student_classes = model_signature(student)
    if (student_shape, student_classes) != (teacher_shape, teacher_classes):
        raise UserInputError(
            f"the student ({student_shape} -> {student_classes} classes) does not match the teacher "
            f"({teacher_shape} -> {teacher_classes} classes): it needs the same input and output shapes"
        )
    check_against_model(train, teacher_shape, teacher_classes)
    teacher_view, student_view = logits_view(teacher, "teacher"), logits_view(student, "student")

    teacher_logits = teacher_view.predict(train.x)
    distiller = _distiller_class()(student_view, alpha=alpha, temperature=temperature)
    distiller.compile(optimizer=keras.optimizers.Adam(learning_rate=learning_rate))
    keras.utils.set_random_seed(seed)
    history = distiller.fit(
        train.x, (train.y, teacher_logits), epochs=epochs, batch_size=batch_size, shuffle=True, verbose=0
    )
    losses = tuple(float(v) for v in history.history["loss"])
    val_accuracy = predict_accuracy(student, validation) if validation is not None else None
    logger.info(
        "distilled %s (%d params) into %s (%d params): loss %.4f -> %.4f, validation accuracy %s",
        teacher.name, teacher.count_params(), student.name, student.count_params(),
        losses[0], losses[-1], "n/a" if val_accuracy is None else f"{val_accuracy:.4f}",
    )  # fmt: skip
    return DistillResult(
        model=student,
        student_params=int(student.count_params()),
        teacher_params=int(teacher.count_params()),
        val_accuracy=val_accuracy,
        epoch_losses=losses,
    )


@functools.cache
def _distiller_class() -> type:
    """The ``Distiller`` model class, defined on first use so that importing this module does not import Keras."""
    keras = import_keras()
    ops = keras.ops

    class Distiller(keras.Model):  # type: ignore[misc,name-defined]
        """Trains the student behind ``view``; the target ``y`` is ``(labels, teacher logits)``.

        Keras 3's ``train_step`` calls ``self(x, training=True)`` (here: the
        student's logits) and then ``compute_loss``, which is all that is
        overridden. The view's features model and head are tracked as
        attributes, so the trainable variables are exactly the student's.
        """

        def __init__(self, view: LogitsView, *, alpha: float, temperature: float) -> None:
            super().__init__(name="distiller")
            self.features = view.features
            self.head = view.head
            self.alpha = float(alpha)
            self.temperature = float(temperature)
            self.hard_loss_tracker = keras.metrics.Mean(name="hard_loss")
            self.soft_loss_tracker = keras.metrics.Mean(name="soft_loss")
            self.accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(name="accuracy")

        def call(self, x: Any, training: bool = False) -> Any:
            return LogitsView(self.features, self.head).logits(x, training=training)

        def compute_loss(
            self, x: Any = None, y: Any = None, y_pred: Any = None, sample_weight: Any = None, training: bool = True
        ) -> Any:
            labels, teacher_logits = y
            t = self.temperature
            hard = ops.mean(keras.losses.sparse_categorical_crossentropy(labels, y_pred, from_logits=True))
            teacher_log_p = ops.log_softmax(teacher_logits / t, axis=-1)
            student_log_p = ops.log_softmax(y_pred / t, axis=-1)
            kl = ops.sum(ops.exp(teacher_log_p) * (teacher_log_p - student_log_p), axis=-1)
            soft = ops.mean(kl) * (t * t)
            loss = self.alpha * hard + (1.0 - self.alpha) * soft
            for extra in self.losses:  # the student's own regularization losses
                loss = loss + ops.sum(extra)
            self.hard_loss_tracker.update_state(hard)
            self.soft_loss_tracker.update_state(soft)
            self.accuracy_tracker.update_state(labels, y_pred)
            return loss

    return Distiller



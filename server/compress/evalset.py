"""The evaluation set a user ships with a model: read, check, slice, write.

An evaluation file is an ``.npz`` archive with two arrays: ``x``, one float
sample per row shaped like the model input without its batch dimension, and
``y``, one integer class label per sample. It is read with
``allow_pickle=False``, so it can never run code. The server evaluates every
variant on it, and a bounded, class-stratified slice of it travels with each
rollout so agents can run the accuracy gate on the device.

numpy only: no TensorFlow here.
"""

from __future__ import annotations

import io
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from shared.errors import StorageError, UserInputError, one_line

DEFAULT_SLICE_SAMPLES = 200
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: same evaluation set, same bytes


@dataclass(frozen=True, eq=False)
class EvalSet:
    """Samples ``x`` (float32, shape ``(n, *sample_shape)``) and labels ``y`` (int64, shape ``(n,)``).

    Both arrays are read-only. Construct it from arrays that are already
    valid; ``load_eval_file`` is where a user's file is checked.
    """

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if self.x.dtype != np.float32 or self.y.dtype != np.int64:
            raise ValueError(f"EvalSet needs float32 x and int64 y, got {self.x.dtype} and {self.y.dtype}")
        if self.x.ndim < 2 or self.y.ndim != 1 or len(self.x) != len(self.y):
            raise ValueError(f"EvalSet shapes do not fit: x {self.x.shape}, y {self.y.shape}")
        for array in (self.x, self.y):
            array.flags.writeable = False

    def __len__(self) -> int:
        return len(self.y)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x.shape[1:])

    def class_counts(self) -> dict[int, int]:
        labels, counts = np.unique(self.y, return_counts=True)
        return {int(label): int(count) for label, count in zip(labels, counts)}


class MissingLabelsError(UserInputError):
    """The file has inputs ``x`` but no labels ``y``."""


def load_eval_file(path: str | os.PathLike[str]) -> EvalSet:
    """Read and check an evaluation ``.npz``; every problem is a one-line ``UserInputError``
    (``MissingLabelsError`` when only ``y`` is missing)."""
    path = Path(path)
    name = path.name
    if not path.exists():
        raise UserInputError(f"evaluation file not found: {path}")
    if not path.is_file():
        raise UserInputError(f"evaluation file {path} is not a regular file")
    if not zipfile.is_zipfile(path):
        raise UserInputError(
            f"{name} is not an .npz archive; save the evaluation set with numpy.savez(path, x=samples, y=labels)"
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = sorted(archive.files)
            missing = [key for key in ("x", "y") if key not in keys]
            if missing:
                error = MissingLabelsError if missing == ["y"] else UserInputError
                raise error(
                    f"{name} has no array {' or '.join(repr(k) for k in missing)} "
                    f"(it has: {', '.join(map(repr, keys)) or 'no arrays'}); "
                    "save it with numpy.savez(path, x=samples, y=labels)"
                )
            x, y = archive["x"], archive["y"]
    except UserInputError:
        raise
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        # ValueError: object (pickled) arrays or a damaged .npy header; the rest: a damaged zip member.
        raise UserInputError(f"{name} is not a readable .npz archive: {one_line(exc)}") from exc
    return _checked(x, y, name)


def load_unlabelled_inputs(path: str | os.PathLike[str]) -> np.ndarray:
    """The ``x`` of an evaluation file that has no labels (checked like a labelled one)."""
    with np.load(Path(path), allow_pickle=False) as archive:
        x = archive["x"]
    return _checked(x, np.zeros(len(x), dtype=np.int64), Path(path).name).x


def check_against_model(evalset: EvalSet, input_shape: tuple[int, ...], num_classes: int) -> None:
    """Raise ``UserInputError`` if ``evalset`` cannot evaluate a model with this signature."""
    expected = tuple(int(d) for d in input_shape)
    if evalset.sample_shape != expected:
        raise UserInputError(
            f"evaluation samples have shape {_shape(evalset.sample_shape)} "
            f"but the model expects inputs of shape {_shape(expected)} (without the batch dimension)"
        )
    top = int(evalset.y.max())
    if top >= num_classes:
        raise UserInputError(
            f"evaluation labels go up to {top} but the model has {num_classes} classes (labels 0..{num_classes - 1})"
        )


def eval_slice(evalset: EvalSet, max_samples: int = DEFAULT_SLICE_SAMPLES, seed: int = 0) -> EvalSet:
    """At most ``max_samples`` samples, drawn per class in proportion to the class sizes.

    Every class is kept when ``max_samples`` allows it. The same input and
    seed give the same slice; the samples keep their order in ``evalset``.
    All of ``evalset`` is returned when it is not larger than ``max_samples``.
    """
    if max_samples < 1:
        raise UserInputError(f"the evaluation slice needs at least 1 sample, got {max_samples}")
    if len(evalset) <= max_samples:
        return evalset
    labels, counts = np.unique(evalset.y, return_counts=True)
    quotas = _stratified_quotas(counts, max_samples)
    rng = np.random.default_rng(seed)
    chosen = [
        rng.permutation(np.flatnonzero(evalset.y == label))[:quota] for label, quota in zip(labels, quotas) if quota
    ]
    index = np.sort(np.concatenate(chosen))
    return EvalSet(x=evalset.x[index], y=evalset.y[index])


def eval_file_bytes(evalset: EvalSet) -> bytes:
    """The ``.npz`` encoding of ``evalset``; identical sets give identical bytes."""
    buffer = io.BytesIO()
    _write_npz(evalset, buffer)
    return buffer.getvalue()


def write_eval_file(evalset: EvalSet, path: str | os.PathLike[str]) -> Path:
    """Write ``evalset`` as an ``.npz`` atomically (temp file, fsync, rename) and return the path."""
    path = Path(path)
    data = eval_file_bytes(evalset)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        raise StorageError(f"cannot write evaluation file {path}: {exc.strerror or exc}") from exc
    return path


# -- helpers -----------------------------------------------------------------


def are_probabilities(scores: np.ndarray) -> bool:
    """Whether a model's outputs are class probabilities (it ends in a softmax): every row non-negative and
    summing to 1. Otherwise they are logits, and a loss must be told so."""
    return bool(np.all(scores >= 0)) and bool(np.allclose(scores.sum(axis=-1), 1.0, atol=1e-3))


def _checked(x: np.ndarray, y: np.ndarray, name: str) -> EvalSet:
    if x.ndim < 2:
        raise UserInputError(f"{name}: 'x' must hold one sample per row, got shape {_shape(x.shape)}")
    if y.ndim != 1:
        hint = " (one-hot labels? store numpy.argmax(y, axis=1))" if y.ndim == 2 else ""
        raise UserInputError(f"{name}: 'y' must be a 1-D array of class labels, got shape {_shape(y.shape)}{hint}")
    if len(x) != len(y):
        raise UserInputError(f"{name}: 'x' has {len(x)} samples but 'y' has {len(y)} labels")
    if len(y) == 0:
        raise UserInputError(f"{name}: the evaluation set is empty")
    if x.dtype.kind not in "fiu":
        raise UserInputError(f"{name}: 'x' must be numeric, got dtype {x.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):
        x32 = x.astype(np.float32)
    bad = int(np.count_nonzero(~np.isfinite(x32)))
    if bad:
        raise UserInputError(f"{name}: 'x' has {bad} values that are NaN, infinite or too large for float32")
    return EvalSet(x=x32, y=_labels(y, name))


def _labels(y: np.ndarray, name: str) -> np.ndarray:
    if y.dtype.kind == "f":
        integral = np.isfinite(y) & (y == np.round(y))
        if not integral.all():
            first = y[np.flatnonzero(~integral)[0]]
            raise UserInputError(f"{name}: labels in 'y' must be whole class numbers, found {float(first):g}")
    elif y.dtype.kind not in "iu":
        raise UserInputError(f"{name}: labels in 'y' must be integers, got dtype {y.dtype}")
    if y.dtype.kind == "u" and y.dtype.itemsize == 8 and int(y.max()) > np.iinfo(np.int64).max:
        raise UserInputError(f"{name}: label {int(y.max())} is too large")
    labels = y.astype(np.int64)
    if labels.min() < 0:
        raise UserInputError(f"{name}: labels in 'y' must be 0 or more, found {int(labels.min())}")
    return labels


def _stratified_quotas(counts: np.ndarray, budget: int) -> np.ndarray:
    """Split ``budget`` (< counts.sum()) over classes by largest remainder, one each first if it fits."""
    base = np.ones_like(counts) if budget >= len(counts) else np.zeros_like(counts)
    rest = budget - int(base.sum())
    share = (counts - base) * rest / int((counts - base).sum())
    quotas = np.floor(share).astype(np.int64)
    leftover = rest - int(quotas.sum())
    by_remainder = np.argsort(-(share - quotas), kind="stable")  # ties go to the lower label
    quotas[by_remainder[:leftover]] += 1
    result: np.ndarray = base + quotas
    return result


def _write_npz(evalset: EvalSet, handle: IO[bytes]) -> None:
    with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED) as archive:
        for key, array in (("x", evalset.x), ("y", evalset.y)):
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"

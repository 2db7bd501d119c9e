"""Compression recipes: zero or more model transforms, then one quantization.

Text form, as users type it and as reports show it::

    int8                      quantize only
    prune:0.5+int8            weight pruning: 50% of the weights zeroed (magnitude), fine-tuned, then full int8
    prune-units:0.5+int8      neuron/filter pruning: half the units and filters removed, fine-tuned, then int8
    prune24+float16           2:4 structured sparsity
    distill:0.5+int8          distil into a half-width copy of the model
    distill:student+int8      distil into the student architecture given with --student
    lowrank:0.9+dynamic_range factorise large Dense layers keeping 90% of the energy

Values are persisted in reports: the text form never changes meaning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from server.compress.quantization import Quantization
from shared.errors import UserInputError

TRANSFORMS = {
    "prune": "target sparsity in (0, 1)",
    "prune-units": "fraction of units and filters to remove, in (0, 1)",
    "prune24": "2:4 structured sparsity (no value)",
    "distill": "student width in (0, 1], or 'student' for the --student model",
    "lowrank": "energy to keep in (0, 1]",
}
RETRAINING = frozenset(TRANSFORMS)  # every transform fine-tunes or trains on data
_STEP = re.compile(r"([a-z0-9]+(?:-[a-z0-9]+)*)(?::([0-9.]+|student))?")


@dataclass(frozen=True)
class Transform:
    kind: str
    value: float | None = None

    def __str__(self) -> str:
        if self.kind == "distill" and self.value is None:
            return "distill:student"
        return self.kind if self.value is None else f"{self.kind}:{self.value:g}"


@dataclass(frozen=True)
class Recipe:
    transforms: tuple[Transform, ...]
    quantization: Quantization

    def __str__(self) -> str:
        return "+".join([*(str(t) for t in self.transforms), self.quantization.value])

    @property
    def retrains(self) -> bool:
        return any(t.kind in RETRAINING for t in self.transforms)


def _transform(text: str, recipe: str) -> Transform:
    match = _STEP.fullmatch(text)
    if match is None or match.group(1) not in TRANSFORMS:
        known = "; ".join(f"{k} ({v})" for k, v in TRANSFORMS.items())
        raise UserInputError(f"unknown step {text!r} in recipe {recipe!r}; steps: {known}")
    kind, raw = match.group(1), match.group(2)
    if kind == "prune24":
        if raw is not None:
            raise UserInputError(f"prune24 takes no value (in {recipe!r})")
        return Transform(kind)
    if raw == "student":
        if kind != "distill":
            raise UserInputError(f"only distill takes 'student' (in {recipe!r})")
        return Transform(kind)  # the user's student architecture
    if raw is None:
        raise UserInputError(f"{kind} needs a value, e.g. {kind}:0.5 (in {recipe!r})")
    try:
        value = float(raw)
    except ValueError:
        raise UserInputError(f"{kind}:{raw} is not a number (in {recipe!r})") from None
    upper_ok = value <= 1 if kind in ("distill", "lowrank") else value < 1
    if not (value > 0 and upper_ok):
        raise UserInputError(f"{kind} takes a {TRANSFORMS[kind]}, got {raw} (in {recipe!r})")
    return Transform(kind, value)


def parse_recipe(text: str) -> Recipe:
    """``step+step+quantization``; raises UserInputError with what was wrong."""
    parts = [p.strip() for p in text.strip().lower().split("+")]
    if not parts or not parts[-1]:
        raise UserInputError(f"empty recipe {text!r}")
    quantization = Quantization.parse(parts[-1])
    transforms = tuple(_transform(p, text) for p in parts[:-1])
    kinds = [t.kind for t in transforms]
    if len(set(kinds)) != len(kinds):
        raise UserInputError(f"recipe {text!r} repeats a step")
    return Recipe(transforms, quantization)


def auto_candidates(
    quantizations: tuple[Quantization, ...], preferred: Quantization, *, has_training_data: bool, has_large_dense: bool,
    has_student: bool = False,
) -> list[Recipe]:
    """What ``auto`` builds for a profile: every allowed quantization as is, and the
    retraining transforms (when there is data to retrain on) with the preferred one."""
    candidates = [Recipe((), q) for q in quantizations]
    if has_training_data:
        transforms = [Transform("prune", 0.5), Transform("prune", 0.8), Transform("prune-units", 0.5),
                      Transform("distill", 0.5)]
        if has_large_dense:
            transforms.append(Transform("lowrank", 0.9))
        if has_student:
            transforms.append(Transform("distill"))
        candidates += [Recipe((t,), preferred) for t in transforms]
    return candidates

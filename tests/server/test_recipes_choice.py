"""Recipes parse strictly; auto's choice follows the budget, the limits and the objective."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from server.compress.pipeline import ProfileGoal, VariantReport, choose, sparse_encoding_verdict
from server.compress.quantization import Quantization
from server.compress.recipes import Recipe, Transform, auto_candidates, parse_recipe
from shared.errors import UserInputError

Q = Quantization


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("int8", Recipe((), Q.INT8)),
        ("prune:0.5+int8", Recipe((Transform("prune", 0.5),), Q.INT8)),
        ("Prune:0.50 + INT8", Recipe((Transform("prune", 0.5),), Q.INT8)),
        ("prune24+float16", Recipe((Transform("prune24"),), Q.FLOAT16)),
        ("prune-units:0.5+int8", Recipe((Transform("prune-units", 0.5),), Q.INT8)),
        ("Prune-Units:0.25+prune:0.5+float16", Recipe((Transform("prune-units", 0.25), Transform("prune", 0.5)),
                                                     Q.FLOAT16)),
        ("distill:0.5+lowrank:0.9+int16x8", Recipe((Transform("distill", 0.5), Transform("lowrank", 0.9)), Q.INT16X8)),
        ("distill:student+int8", Recipe((Transform("distill"),), Q.INT8)),
    ],
)
def test_recipes_parse_and_print_canonically(text: str, expected: Recipe) -> None:
    recipe = parse_recipe(text)
    assert recipe == expected
    assert parse_recipe(str(recipe)) == recipe


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty recipe"),
        ("int4", "unknown quantization"),
        ("prune+int8", "prune needs a value"),
        ("prune:1+int8", "target sparsity in (0, 1)"),
        ("prune:0+int8", "target sparsity"),
        ("distill:1.5+int8", "student width"),
        ("prune24:0.5+int8", "takes no value"),
        ("shrink:0.5+int8", "unknown step"),
        ("prune:0.5+prune:0.8+int8", "repeats a step"),
        ("prune:x+int8", "unknown step"),
        ("prune:student+int8", "only distill takes 'student'"),
        ("prune-units:1+int8", "fraction of units and filters to remove, in (0, 1)"),
        ("prune-units+int8", "prune-units needs a value"),
        ("prune-+int8", "unknown step"),
        ("-prune:0.5+int8", "unknown step"),
    ],
)
def test_bad_recipes_are_clear_errors(text: str, fragment: str) -> None:
    with pytest.raises(UserInputError) as error:
        parse_recipe(text)
    assert fragment in str(error.value)


def test_auto_candidates_add_retraining_steps_only_with_training_data() -> None:
    plain = auto_candidates((Q.INT8, Q.FLOAT32), Q.INT8, has_training_data=False, has_large_dense=True)
    assert [str(r) for r in plain] == ["int8", "float32"]
    full = auto_candidates((Q.INT8, Q.FLOAT32), Q.INT8, has_training_data=True, has_large_dense=True)
    assert [str(r) for r in full] == [
        "int8", "float32", "prune:0.5+int8", "prune:0.8+int8", "prune-units:0.5+int8", "distill:0.5+int8",
        "lowrank:0.9+int8",
    ]
    no_dense = auto_candidates((Q.INT8,), Q.INT8, has_training_data=True, has_large_dense=False)
    assert "lowrank:0.9+int8" not in [str(r) for r in no_dense]


def variant(recipe: str, *, size: int, acc: float, p95: float, rss: int = 50_000_000) -> VariantReport:
    q = parse_recipe(recipe).quantization.value
    return VariantReport(recipe, q, tflite=b"x", size_bytes=size, gzip_bytes=size, accuracy=acc, agreement=1.0,
                         p50_ms=p95 * 0.9, p95_ms=p95, peak_rss_bytes=rss)


REFERENCE = 0.98
CANDIDATES = [
    variant("float32", size=176_000, acc=0.98, p95=0.50),
    variant("dynamic_range", size=50_000, acc=0.98, p95=0.60),
    variant("float16", size=92_000, acc=0.98, p95=0.50),
    variant("int8", size=53_000, acc=0.975, p95=0.20),
    variant("prune:0.8+int8", size=53_000, acc=0.95, p95=0.19),
]


def verdicts(reports: list[VariantReport]) -> dict[str, str]:
    return {r.recipe: r.verdict for r in reports}


def test_latency_objective_picks_the_fastest_within_budget() -> None:
    chosen = choose(CANDIDATES, ProfileGoal("rpi4", Q.INT8), REFERENCE)
    assert verdicts(chosen) == {
        "float32": "ok", "dynamic_range": "ok", "float16": "ok", "int8": "chosen", "prune:0.8+int8": "over_budget",
    }
    assert "below 0.9700" in next(r for r in chosen if r.recipe == "prune:0.8+int8").reason


def test_size_objective_picks_the_smallest_within_budget() -> None:
    chosen = choose(CANDIDATES, ProfileGoal("zero", Q.INT8, objective="size"), REFERENCE)
    assert [r.recipe for r in chosen if r.chosen] == ["dynamic_range"]


def test_ties_inside_the_noise_band_go_to_the_preferred_quantization_then_size() -> None:
    close = [
        variant("float32", size=176_000, acc=0.98, p95=0.0045),
        variant("float16", size=92_000, acc=0.98, p95=0.0046),
        variant("int8", size=53_000, acc=0.98, p95=0.0025),
        variant("dynamic_range", size=50_000, acc=0.98, p95=0.0024),
    ]
    jetson = choose(close[:2], ProfileGoal("jetson-nano", Q.FLOAT16), REFERENCE)
    assert [r.recipe for r in jetson if r.chosen] == ["float16"]
    pi = choose(close, ProfileGoal("rpi4", Q.INT8), REFERENCE)
    assert [r.recipe for r in pi if r.chosen] == ["int8"]
    # outside the band, measurement wins over preference
    slow_float16 = [close[0], variant("float16", size=92_000, acc=0.98, p95=0.50)]
    assert [r.recipe for r in choose(slow_float16, ProfileGoal("j", Q.FLOAT16), REFERENCE) if r.chosen] == ["float32"]


def test_limits_refuse_variants_with_the_reason() -> None:
    goal = ProfileGoal("tiny", Q.INT8, max_model_bytes=60_000, max_ram_bytes=40_000_000)
    chosen = choose(CANDIDATES[:4], goal, REFERENCE)
    assert verdicts(chosen)["float32"] == "too_big"
    assert "exceed tiny's limit of 60000" in next(r for r in chosen if r.recipe == "float32").reason
    assert all(r.verdict == "too_big" for r in chosen)  # 50 MB RSS each is over 40 MB
    assert not any(r.chosen for r in chosen)


def test_failed_builds_stay_failed_and_are_never_chosen() -> None:
    failed = VariantReport("prune:0.5+int8", "int8", verdict="failed", reason="pruning failed: boom")
    chosen = choose([failed, CANDIDATES[0]], ProfileGoal("x", Q.INT8), REFERENCE)
    assert verdicts(chosen) == {"prune:0.5+int8": "failed", "float32": "chosen"}


@pytest.mark.parametrize(
    ("dense", "dense_parts", "sparse", "sparse_parts", "use_sparse", "fragment"),
    [
        (100, 2, 60, 2, True, "sparse (60 bytes vs 100 dense)"),
        (100, 2, 60, 0, False, "did not delegate the sparse encoding (0 partitions vs 2), fell back"),
        (100, 3, 60, 1, False, "did not delegate"),
        (100, 2, 120, 2, False, "saved nothing"),
    ],
)
def test_sparse_encoding_falls_back_when_xnnpack_would_not_delegate_it(
    dense: int, dense_parts: int, sparse: int, sparse_parts: int, use_sparse: bool, fragment: str
) -> None:
    decision, note = sparse_encoding_verdict(dense, dense_parts, sparse, sparse_parts)
    assert decision is use_sparse
    assert fragment in note


def test_inside_the_latency_band_higher_accuracy_wins_before_smaller_size() -> None:
    band = [
        variant("int8", size=53_000, acc=0.975, p95=0.200),
        variant("distill:0.5+int8", size=20_000, acc=0.972, p95=0.195),
        variant("lowrank:0.9+int8", size=30_000, acc=0.978, p95=0.205),
    ]
    chosen = choose(band, ProfileGoal("rpi4", Q.INT8), REFERENCE)
    assert [r.recipe for r in chosen if r.chosen] == ["lowrank:0.9+int8"]
    assert "then accuracy, then size" in next(r for r in chosen if r.chosen).reason
    equal = [variant("int8", size=53_000, acc=0.975, p95=0.2), variant("distill:0.5+int8", size=20_000, acc=0.975,
                                                                        p95=0.2)]
    assert [r.recipe for r in choose(equal, ProfileGoal("rpi4", Q.INT8), REFERENCE) if r.chosen] == ["distill:0.5+int8"]


@pytest.mark.parametrize("objective", ["latency", "size"])
def test_a_transform_that_ships_as_many_bytes_as_the_plain_variant_is_not_preferred(objective: str) -> None:
    """Pruning whose sparse encoding fell back to dense int8 ships a file as large as plain int8: even a bit
    faster and a bit more accurate in the host's measurement, the simpler variant is chosen."""
    reports = [
        variant("float32", size=176_000, acc=0.98, p95=0.5),
        variant("int8", size=53_000, acc=0.975, p95=0.200),
        variant("prune:0.5+int8", size=53_000, acc=0.976, p95=0.199),
    ]
    chosen = choose(reports, ProfileGoal("rpi4", Q.INT8, objective=objective), REFERENCE)
    assert verdicts(chosen) == {"float32": "ok", "int8": "chosen", "prune:0.5+int8": "ok"}
    pruned = next(r for r in chosen if r.recipe == "prune:0.5+int8")
    assert pruned.reason == "ships as many bytes as plain int8: the simpler variant is preferred"
    # Without the plain variant to compare with, the pruned one is a candidate like any other.
    alone = choose([reports[0], reports[2]], ProfileGoal("rpi4", Q.INT8, objective=objective), REFERENCE)
    assert [r.recipe for r in alone if r.chosen] == ["prune:0.5+int8"]


def test_profiles_asking_for_the_same_variant_share_one_build_and_measurement(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A build for several profiles converts and measures a (recipe, threads) pair once; each profile still
    judges it against its own goal, and a profile with another thread count measures again."""
    from server.compress import pipeline
    from server.compress.pipeline import CompressionInputs, compress_for_profile

    built: list[tuple[str, int]] = []

    def fake_build(recipe: Recipe, inputs: Any, workdir: Path, threads: int = 1, step: Any = None, **_: Any
                   ) -> VariantReport:
        built.append((str(recipe), threads))
        return variant(str(recipe), size=50_000 if recipe.quantization is Q.INT8 else 170_000, acc=0.98, p95=0.2)

    monkeypatch.setattr(pipeline, "build_variant", fake_build)
    monkeypatch.setattr(pipeline, "float_reference", lambda inputs: (REFERENCE, None))
    inputs = CompressionInputs.__new__(CompressionInputs)  # no model needed: building is faked
    inputs._variants = {}
    recipes = [parse_recipe("int8"), parse_recipe("float32")]
    _, pi = compress_for_profile(recipes, inputs, ProfileGoal("rpi4", Q.INT8))
    _, small = compress_for_profile(recipes, inputs, ProfileGoal("zero", Q.FLOAT32, max_model_bytes=60_000))
    _, jetson = compress_for_profile(recipes, inputs, ProfileGoal("jetson", Q.INT8, threads=4))
    assert built == [("int8", 1), ("float32", 1), ("int8", 4), ("float32", 4)]
    assert verdicts(pi) == {"int8": "chosen", "float32": "ok"}
    assert verdicts(small) == {"int8": "chosen", "float32": "too_big"}  # judged against its own limits
    assert verdicts(jetson) == {"int8": "chosen", "float32": "ok"}

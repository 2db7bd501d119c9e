"""What a trial measures: the staged candidate and the committed model it would replace.

The updater starts the trial child with ``trial_request`` and reads the
replaced model's numbers back with ``previous_model``; both sides of the
comparison come from the same child, the same settings and the same eval
samples, timed interleaved when both fit in memory at once (``shared/trial.py``),
and ``agent/gates.py`` compares them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from agent.config import AgentConfig
from agent.memory import MemoryBudget
from agent.slots import SlotStore
from shared.errors import EdgefleetError
from shared.messages import Manifest, PreviousModel
from shared.trial import TrialRequest, TrialResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplacedModel:
    manifest: Manifest
    path: Path  # its model file in the active slot


def replaced_model(slots: SlotStore, trial_slot: str) -> ReplacedModel | None:
    """The committed model a candidate staged in ``trial_slot`` would replace; None on a device with no
    model yet, when the active slot is the one on trial, or when the active slot is unreadable (the
    comparison gates are then skipped, the trial itself goes on)."""
    try:
        active = slots.active_slot()
        manifest = slots.manifest(active) if active is not None and active != trial_slot else None
    except (EdgefleetError, OSError, ValueError) as exc:
        logger.warning("the committed model is unreadable (%s): the trial does not compare with it", exc)
        return None
    if active is None or manifest is None:
        return None
    return ReplacedModel(manifest, slots.file_path(active, manifest.file("model")))


def trial_request(
    config: AgentConfig, slots: SlotStore, manifest: Manifest, slot: str, budget: MemoryBudget,
    replaced: ReplacedModel | None,
) -> TrialRequest:
    bench = config.benchmark
    return TrialRequest(
        model_path=str(slots.file_path(slot, manifest.file("model"))),
        eval_path=str(slots.file_path(slot, manifest.file("eval"))),
        threads=config.runtime.threads_for(manifest.threads),
        runtime=config.runtime.preferred,
        warmup_runs=bench.warmup_runs,
        warmup_seconds=bench.warmup_seconds,
        min_runs=bench.min_runs,
        min_seconds=bench.min_seconds,
        memory_limit_mb=budget.limit_mb,
        previous_model_path=None if replaced is None else str(replaced.path),
    )


def previous_model(replaced: ReplacedModel | None, result: TrialResult) -> PreviousModel | None:
    """The replaced model's numbers from this trial, named by its manifest; None (logged) when it
    could not run on this eval set."""
    if replaced is None:
        return None
    manifest = replaced.manifest
    if result.previous_benchmark is None or result.previous_accuracy is None:
        logger.warning(
            "could not measure the replaced model %s v%s on this eval set, so the gates do not compare with "
            "it: %s", manifest.model, manifest.version, result.previous_error or "no numbers came back",
        )
        return None
    if not result.paired:
        logger.info(
            "the replaced model %s v%s did not fit in the trial's memory beside the candidate: it was timed "
            "alone after it, so a burst of load on the device may skew the latency ratio", manifest.model,
            manifest.version,
        )
    return PreviousModel(
        model=manifest.model,
        version=manifest.version,
        sha256=manifest.file("model").sha256,
        accuracy=result.previous_accuracy,
        p50_ms=result.previous_benchmark.p50_ms,
        p95_ms=result.previous_benchmark.p95_ms,
    )

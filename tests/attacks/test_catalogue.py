"""The suite checks itself: its catalogue names every attack test, and its two assertions can fail.

A refusal assertion that passes whatever happens would make every attack test
pass too, so each way an attack could succeed is shown to trip it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import tests.attacks
from agent.states import State
from shared.messages import UpdateState
from shared.mqtt import Inbound
from shared.topics import TopicKind, device_topic
from shared.trial import TrialResult
from tests.agent.fakes import install_first
from tests.attacks.harness import AttackHarness, assert_attack_refused
from tests.attacks.ingest import assert_ingest_refused, ingest_bench

HERE = Path(__file__).parent
FORGED = "rejected: no valid signature by a pinned release key"


def attack_tests() -> dict[str, set[str]]:
    """Every test function of every ``test_*_attacks.py`` module, by module file name."""
    found: dict[str, set[str]] = {}
    for module in sorted(HERE.glob("test_*_attacks.py")):
        tree = ast.parse(module.read_text())
        found[module.name] = {node.name for node in tree.body
                              if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}
    return found


def test_the_catalogue_lists_every_attack_test_under_its_module() -> None:
    doc = tests.attacks.__doc__ or ""
    listed: dict[str, set[str]] = {}
    module = ""
    for line in doc.splitlines():
        if heading := re.match(r"^(test_\w+_attacks\.py): ", line):
            module = heading.group(1)
            listed.setdefault(module, set())
        elif entry := re.match(r"^- ``(test_\w+)``: \S", line):
            assert module, f"{entry.group(1)} is listed before any module heading"
            listed[module].add(entry.group(1))
    assert listed == attack_tests(), (
        "tests/attacks/__init__.py lists every attack test under its module's heading, with what stops it")


# -- assert_attack_refused trips on every way an attack can succeed ----------------------------------


def test_an_attack_the_agent_said_nothing_about_is_not_refused(harness: AttackHarness) -> None:
    install_first(harness)
    with pytest.raises(AssertionError, match="the agent never said"):
        assert_attack_refused(harness, lambda h: None, FORGED)


def test_an_attack_that_moves_the_trusted_state_is_not_refused(harness: AttackHarness) -> None:
    install_first(harness)
    forged, genuine = harness.release(version=2, release_key=harness.keys.attacker), harness.release(version=3)

    def forged_then_genuine(h: AttackHarness) -> None:
        h.updater.offer(forged.desired)
        h.install(genuine)

    with pytest.raises(AssertionError, match="moved the trusted state or the active model"):
        assert_attack_refused(harness, forged_then_genuine, FORGED)


def test_an_attack_that_changes_the_active_model_is_not_refused(harness: AttackHarness) -> None:
    first = install_first(harness)
    forged = harness.release(version=2, release_key=harness.keys.attacker)

    def forged_and_overwritten(h: AttackHarness) -> None:
        h.updater.offer(forged.desired)
        h.slot_file("a").write_bytes(first.model[::-1])

    with pytest.raises(AssertionError, match="moved the trusted state or the active model"):
        assert_attack_refused(harness, forged_and_overwritten, FORGED)


def test_an_attack_that_leaves_a_file_behind_is_not_refused(harness: AttackHarness) -> None:
    install_first(harness)
    forged = harness.release(version=2, release_key=harness.keys.attacker)

    def forged_and_dropped(h: AttackHarness) -> None:
        h.updater.offer(forged.desired)
        (h.data_dir / "slots" / "b").mkdir()
        (h.data_dir / "slots" / "b" / "model.tflite").write_bytes(b"planted")

    with pytest.raises(AssertionError, match="changed the data dir"):
        assert_attack_refused(harness, forged_and_dropped, FORGED)


def test_an_attack_that_leaves_the_agent_unable_to_update_is_not_refused(harness: AttackHarness) -> None:
    install_first(harness)
    forged = harness.release(version=2, release_key=harness.keys.attacker)

    def forged_and_wedged(h: AttackHarness) -> None:
        h.updater.offer(forged.desired)
        h.trial.result = TrialResult(ok=False, error="every model crashes now")

    with pytest.raises(AssertionError, match="the next good update did not commit"):
        assert_attack_refused(harness, forged_and_wedged, FORGED)
    assert harness.updater.state is State.IDLE
    assert harness.reporter.events[-1][1] is UpdateState.ROLLED_BACK


# -- assert_ingest_refused trips too ---------------------------------------------------------------------


def test_a_report_the_server_stores_is_not_refused(tmp_path: Path) -> None:
    with ingest_bench(tmp_path / "data") as server:
        stored = server.witness()
        with pytest.raises(AssertionError):
            assert_ingest_refused(server, stored, "anything")


def test_a_message_dropped_for_another_reason_is_not_this_refusal(tmp_path: Path) -> None:
    with ingest_bench(tmp_path / "data") as server:
        message = Inbound(device_topic(TopicKind.EVENTS, server.device), b"{not json", False)
        with pytest.raises(AssertionError):
            assert_ingest_refused(server, message, "payload nests deeper than 64 levels")
        assert_ingest_refused(server, message, "payload is not JSON: Expecting property name enclosed in double "
                              "quotes: line 1 column 2 (char 1)")


def test_the_catalogue_parser_sees_the_tests() -> None:
    found = attack_tests()
    assert "test_unknown_release_key" in found["test_updater_metadata_attacks.py"]
    assert sum(len(names) for names in found.values()) >= 27

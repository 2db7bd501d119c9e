"""Attacks on the signed metadata: keys, targets, replay, rollback, freeze, mix-and-match.

Every case starts from an agent that installed a release (counter 5) under
directive sequence 5 and is offered a desired state a real attacker could
build: with its own key, a genuine document of another time, device or
profile, or genuine documents paired wrongly. What stops each one is in
``agent/trust.py`` (``verify_desired``) and ``shared/signing.py``.
"""

from __future__ import annotations

import pytest

from shared.messages import DesiredState, SignedEnvelope
from tests.agent.fakes import HAPPY, install_first
from tests.agent.material import NOW, Release, make_release, payload
from tests.attacks.harness import Attack, AttackHarness, assert_attack_refused, with_signed

FIRST = 5  # the installed release's counter and its directive's sequence


@pytest.fixture
def installed(harness: AttackHarness) -> Release:
    return install_first(harness, seq=FIRST, release_counter=FIRST)


def offered(desired: DesiredState) -> Attack:
    return lambda h: h.updater.offer(desired)


# -- keys ------------------------------------------------------------------------------------------


def test_unknown_release_key(harness: AttackHarness, installed: Release) -> None:
    forged = harness.release(version=7, release_key=harness.keys.attacker)
    assert_attack_refused(harness, offered(forged.desired), "rejected: no valid signature by a pinned release key")


def test_unknown_director_key(harness: AttackHarness, installed: Release) -> None:
    forged = harness.release(version=7, director_key=harness.keys.attacker)
    assert_attack_refused(harness, offered(forged.desired), "rejected: no valid signature by a pinned director key")


def test_release_signed_with_the_director_key(harness: AttackHarness, installed: Release) -> None:
    """The online server's key alone cannot push a model (Uptane's split)."""
    forged = harness.release(version=7, release_key=harness.keys.director)
    assert_attack_refused(harness, offered(forged.desired), "rejected: no valid signature by a pinned release key")


def test_directive_signed_with_the_release_key(harness: AttackHarness, installed: Release) -> None:
    forged = harness.release(version=7, director_key=harness.keys.release)
    assert_attack_refused(harness, offered(forged.desired), "rejected: no valid signature by a pinned director key")


def test_model_file_swapped_after_signing(harness: AttackHarness, installed: Release) -> None:
    genuine = harness.release(version=7)
    evil = make_release(harness.keys, version=7, model=payload("evil", 300), release_key=harness.keys.attacker)
    swapped = with_signed(genuine.manifest_env, files=evil.manifest_env.signed["files"])
    attack = DesiredState(v=1, directive=genuine.directive_env, manifest=swapped)
    assert_attack_refused(harness, offered(attack), "rejected: no valid signature by a pinned release key")


def test_manifest_without_signatures(harness: AttackHarness, installed: Release) -> None:
    genuine = harness.release(version=7)
    unsigned = SignedEnvelope(signed=genuine.manifest_env.signed, signatures=())
    attack = DesiredState(v=1, directive=genuine.directive_env, manifest=unsigned)
    assert_attack_refused(harness, offered(attack), "rejected: release metadata carries no signature")


# -- targets ---------------------------------------------------------------------------------------


def test_directive_for_another_device(harness: AttackHarness, installed: Release) -> None:
    """A genuine directive the server signed for another device, replayed to this one."""
    theirs = harness.release(version=7, device_id="pi-garage-02")
    assert_attack_refused(harness, offered(theirs.desired), "rejected: directive is for device pi-garage-02, not "
                          "pi-kitchen-01")


def test_release_for_another_profile(harness: AttackHarness, installed: Release) -> None:
    """A genuine release built for another board, under a directive naming this device (the director key
    alone cannot cross profiles: Uptane's hardware-identifier check)."""
    other = harness.release(version=7, profile="jetson-orin")
    assert_attack_refused(harness, offered(other.desired),
                          "rejected: release kws v7 is built for profile jetson-orin, this device is rpi5")


# -- replay and rollback ---------------------------------------------------------------------------


def test_replayed_directive_with_a_lower_sequence(harness: AttackHarness, installed: Release) -> None:
    """The directive the server sent before the installed one, for the same release: genuine, superseded."""
    earlier = harness.release(version=1, release_counter=FIRST, seq=FIRST - 1, deployment_id="dep-earlier")
    assert earlier.manifest_env == installed.manifest_env
    assert_attack_refused(harness, offered(earlier.desired), "rejected: directive sequence 4 is lower than the "
                          "trusted 5")


def test_replayed_directive_with_the_same_sequence_for_another_deployment(
    harness: AttackHarness, installed: Release
) -> None:
    other = harness.release(version=7, seq=FIRST, deployment_id="dep-evil")
    assert_attack_refused(harness, offered(other.desired), "rejected: directive sequence 5 was already used")


def test_rollback_to_an_older_genuine_release(harness: AttackHarness, installed: Release) -> None:
    """A fresh directive (a compromised director, or a mistaken operator) pinning the genuine manifest of an
    older release: the release counter never goes back."""
    harness.install(harness.release(version=2, seq=FIRST + 1, release_counter=FIRST + 1))
    rollback = harness.release(version=1, release_counter=FIRST, seq=FIRST + 2, deployment_id="dep-rollback")
    assert rollback.manifest_env == installed.manifest_env  # the genuine old release, signatures and all
    assert_attack_refused(harness, offered(rollback.desired), "rejected: release counter 5 is lower than the "
                          "trusted 6")


def test_replayed_old_desired_state(harness: AttackHarness, installed: Release) -> None:
    """Both genuine documents of an install long superseded, exactly as they were sent."""
    current = harness.release(version=6, seq=FIRST + 1, release_counter=FIRST + 1)
    harness.install(current)
    harness.reporter.clear()

    def replay(h: AttackHarness) -> None:
        h.updater.offer(installed.desired)
        h.updater.offer(current.desired)  # the retained copy of what runs today: nothing to say
        assert h.reporter.events == []

    assert_attack_refused(harness, replay, "rejected: release counter 5 is lower than the trusted 6")


def test_forgery_replayed_on_every_reconnect(
    harness: AttackHarness, installed: Release
) -> None:
    """A retained forgery comes again with every reconnect: one report, not a flood."""
    forged = harness.release(version=7, release_key=harness.keys.attacker)

    def again_and_again(h: AttackHarness) -> None:
        for _ in range(3):
            h.updater.offer(forged.desired)
        assert len(h.reporter.rejections) == 1

    assert_attack_refused(harness, again_and_again, "rejected: no valid signature by a pinned release key")


# -- freeze ----------------------------------------------------------------------------------------


def test_expired_manifest(harness: AttackHarness, installed: Release) -> None:
    """A freeze: old metadata held back and offered later, so the device never learns of newer releases."""
    stale = harness.release(version=7, manifest_expires=NOW)
    assert_attack_refused(harness, offered(stale.desired), "rejected: manifest for kws v7 expired at 1700000000")


def test_expired_directive(harness: AttackHarness, installed: Release) -> None:
    stale = harness.release(version=7, directive_expires=NOW - 1)
    assert_attack_refused(harness, offered(stale.desired), "rejected: directive dep-7 expired at 1699999999")


# -- mix and match ---------------------------------------------------------------------------------


def test_directive_paired_with_another_genuine_manifest(harness: AttackHarness, installed: Release) -> None:
    """Each document genuine, the pair not: the directive for release 7 under the manifest of release 8."""
    directed, other = harness.release(version=7), harness.release(version=8)
    mixed = DesiredState(v=1, directive=directed.directive_env, manifest=other.manifest_env)
    assert_attack_refused(harness, offered(mixed), "rejected: directive does not pin this manifest")


def test_forgery_evicting_a_pending_directive(harness: AttackHarness) -> None:
    h = harness
    first, second = h.release(version=1), h.release(version=2)
    forged = h.release(version=3, director_key=h.keys.attacker)
    h.trial.hold = True  # the first install sits in its trial
    h.install(first)
    h.updater.offer(second.desired)
    assert h.updater.pending == second.desired

    def evict(h: AttackHarness) -> None:
        h.updater.offer(forged.desired)
        assert h.updater.pending == second.desired
        assert h.reporter.states(forged.deployment_id) == []  # never reported on as a deployment

    assert_attack_refused(h, evict, "rejected: no valid signature by a pinned director key")
    assert h.reporter.states(first.deployment_id) == HAPPY

"""Canonical-JSON tricks and signature-list tricks, on the wire: the bytes a broker would hand the agent.

Signatures cover the canonical JSON of the *parsed* document
(``shared/canonical.py``), and the agent acts on that parsed document: so a
trick works only if one text can parse to two documents (stopped by refusing
duplicate keys), or if a text parses to something with no canonical form
(NaN, infinities, lone surrogates: refused before any check), or if a
different value re-encodes to the signed bytes (it cannot: 7.0 is not 7).
A signature list is searched for any one valid signature of a pinned key, so
a bad entry neither blocks the genuine signature behind it nor adds weight.
"""

from __future__ import annotations

import base64
import json
import re

import pytest

from shared.messages import DesiredState, Signature, SignedEnvelope
from shared.signing import key_id
from tests.agent.fakes import HAPPY, install_first
from tests.agent.material import DEVICE, Release
from tests.attacks.harness import Attack, AttackHarness, assert_attack_refused, desired_text, with_signed

DROPPED = f"dropped a malformed message on ef/v1/devices/{DEVICE}/desired: "


@pytest.fixture
def target(harness: AttackHarness) -> Release:
    """A genuine release 2 the attacker edits on its way; release 1 is installed."""
    install_first(harness)
    return harness.release(version=2)


def edited(release: Release, old: str, new: str) -> bytes:
    """The genuine desired state as canonical text, with ``old`` (which must occur once) replaced."""
    text = desired_text(release.desired)
    assert text.count(old) == 1, old
    return text.replace(old, new).encode()


def delivered(payload: bytes) -> Attack:
    return lambda h: h.deliver_desired(payload)


# -- one text, two documents -----------------------------------------------------------------------


def test_duplicate_key(harness: AttackHarness, target: Release) -> None:
    """Read last-wins, {"model": "evil", ..., "model": "kws"} verifies as the genuine manifest, while a
    first-wins reader sees "evil": no two parsers may see two documents behind one signature."""
    doubled = edited(target, '"model":"kws"', '"model":"evil","model":"kws"')
    assert json.loads(doubled) == json.loads(desired_text(target.desired))  # last-wins: the signed document
    assert_attack_refused(harness, delivered(doubled), DROPPED + "payload is not JSON: duplicate key 'model'")


def test_duplicate_key_behind_a_unicode_escape(harness: AttackHarness, target: Release) -> None:
    """The same trick with the second key spelled ``mod\\u0065l``: keys are compared once decoded."""
    doubled = edited(target, '"model":"kws"', '"model":"evil","mod\\u0065l":"kws"')
    assert_attack_refused(harness, delivered(doubled), DROPPED + "payload is not JSON: duplicate key 'model'")


# -- numbers ---------------------------------------------------------------------------------------


def test_non_canonical_number(harness: AttackHarness, target: Release) -> None:
    """7.0 for the signed 7: equal to Python's ==, but it re-encodes as 7.0, which nobody signed."""
    attack = edited(target, '"release_counter":2', '"release_counter":2.0')
    assert_attack_refused(harness, delivered(attack), "rejected: no valid signature by a pinned release key")


def test_exponent_form_of_an_integer(harness: AttackHarness, target: Release) -> None:
    attack = edited(target, '"seq":2', '"seq":2e0')
    assert_attack_refused(harness, delivered(attack), "rejected: no valid signature by a pinned director key")


def test_nan(harness: AttackHarness, target: Release) -> None:
    """NaN compares false with everything: a gate of NaN would never fail."""
    attack = edited(target, '"min_accuracy":0.8', '"min_accuracy":NaN')
    assert_attack_refused(harness, delivered(attack), DROPPED + "payload is not JSON: NaN is not allowed")


def test_infinity(harness: AttackHarness, target: Release) -> None:
    attack = edited(target, '"max_p95_ms":10.0', '"max_p95_ms":Infinity')
    assert_attack_refused(harness, delivered(attack), DROPPED + "payload is not JSON: Infinity is not allowed")


def test_a_number_that_overflows_to_infinity(harness: AttackHarness, target: Release) -> None:
    """1e999 is valid JSON that Python would read as inf, with no parse_constant call: refused as it is parsed."""
    attack = edited(target, '"max_p95_ms":10.0', '"max_p95_ms":1e999')
    assert_attack_refused(harness, delivered(attack), DROPPED + "payload is not JSON: number 1e999 is out of range")


# -- strings ---------------------------------------------------------------------------------------


def test_unicode_escape_with_no_canonical_form(harness: AttackHarness, target: Release) -> None:
    """A lone surrogate (``\\ud800``) parses, but has no UTF-8 encoding: no canonical form, no signature."""
    attack = edited(target, '"model":"kws"', '"model":"kws\\ud800"')
    assert_attack_refused(harness, delivered(attack), re.compile(
        re.escape(DROPPED + "value is not canonical JSON: 'utf-8' codec can't encode character '\\ud800' in "
                  "position ") + r"\d+: surrogates not allowed"))


# -- signatures ------------------------------------------------------------------------------------


def test_signature_over_a_non_canonical_encoding(harness: AttackHarness, target: Release) -> None:
    """A genuine release-key signature over another encoding of the manifest (a signer that did not
    canonicalise, or a signature made for another format) does not verify the document."""
    text = json.dumps(target.manifest_env.signed, indent=2).encode()
    sig = base64.b64encode(harness.keys.release.sign(text)).decode()
    keyid = key_id(harness.keys.release.public_key())
    resigned = SignedEnvelope(signed=target.manifest_env.signed, signatures=(Signature(keyid, sig),))
    attack = DesiredState(v=1, directive=target.directive_env, manifest=resigned)
    assert_attack_refused(harness, delivered(desired_text(attack).encode()),
                          "rejected: no valid signature by a pinned release key")


def _release_keyid(h: AttackHarness) -> str:
    return key_id(h.keys.release.public_key())


def test_a_bad_signature_ahead_of_a_good_one(harness: AttackHarness, target: Release) -> None:
    """A forged signature under the pinned key's id, ahead of the genuine one: over a tampered manifest
    the genuine signature does not help; over the genuine manifest the forged one does not hurt."""
    h = harness
    keyid = _release_keyid(h)
    forged = Signature(keyid, base64.b64encode(h.keys.attacker.sign(b"anything")).decode())
    garbled = Signature(keyid, "not base64!")
    tampered = with_signed(target.manifest_env, quantization="float32")
    attack = SignedEnvelope(tampered.signed, (forged, garbled, *target.manifest_env.signatures))
    assert_attack_refused(h, lambda h: h.updater.offer(DesiredState(1, target.directive_env, attack)),
                          "rejected: no valid signature by a pinned release key")

    genuine = h.release(version=h.highest + 1)
    padded = SignedEnvelope(genuine.manifest_env.signed, (forged, garbled, *genuine.manifest_env.signatures))
    h.reporter.clear()
    h.install(Release(genuine.manifest, genuine.directive, padded, genuine.directive_env, genuine.model,
                      genuine.eval))
    assert h.reporter.states(genuine.deployment_id) == HAPPY
    assert h.reporter.rejections == []


def test_duplicated_signature(harness: AttackHarness, target: Release) -> None:
    """The genuine signature listed many times over a tampered manifest is still no valid signature;
    over the genuine one, it is one signature: one deployment, installed once."""
    h = harness
    tampered = with_signed(target.manifest_env, quantization="float32")
    attack = SignedEnvelope(tampered.signed, target.manifest_env.signatures * 3)
    assert_attack_refused(h, lambda h: h.updater.offer(DesiredState(1, target.directive_env, attack)),
                          "rejected: no valid signature by a pinned release key")

    genuine = h.release(version=h.highest + 1)
    doubled = SignedEnvelope(genuine.manifest_env.signed, genuine.manifest_env.signatures * 2)
    h.reporter.clear()
    trials = len(h.trial.requests)
    h.install(Release(genuine.manifest, genuine.directive, doubled, genuine.directive_env, genuine.model,
                      genuine.eval))
    assert h.reporter.states(genuine.deployment_id) == HAPPY
    assert len(h.trial.requests) == trials + 1

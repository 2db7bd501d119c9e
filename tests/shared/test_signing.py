"""Signing and verification: happy paths, every attack with its exact error, rotation, canonical JSON."""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.canonical import canonical_digest, canonical_json
from shared.codec import encode
from shared.errors import (
    ConfigError,
    ExpiredError,
    IntegrityError,
    ProtocolError,
    ReplayError,
    SignatureError,
    TargetError,
    TrustError,
)
from shared.messages import DesiredState, Signature, SignedEnvelope, decode_payload, encode_payload
from shared.signing import (
    KeyRole,
    TrustedKeys,
    envelope_digest,
    key_id,
    private_key_from_pem,
    private_key_pem,
    public_key_from_text,
    public_key_text,
    sign_envelope,
    verify_directive,
    verify_manifest,
)
from shared.topics import TopicKind
from tests.shared.factories import DAY, NOW, json_objects, json_values, make_directive, make_manifest

DEVICE = "pi-kitchen-01"

# Key generation is cheap, but fixed module-level keys keep hypothesis tests deterministic in cost.
RELEASE = Ed25519PrivateKey.generate()
RELEASE_NEXT = Ed25519PrivateKey.generate()
DIRECTOR = Ed25519PrivateKey.generate()
DIRECTOR_NEXT = Ed25519PrivateKey.generate()
ATTACKER = Ed25519PrivateKey.generate()


def pin(release: list[Ed25519PrivateKey] | None = None, director: list[Ed25519PrivateKey] | None = None) -> TrustedKeys:
    """TrustedKeys the way an agent gets them at enrolment: public key texts per role."""
    by_role: dict[KeyRole, list[str]] = {}
    if release is not None:
        by_role[KeyRole.RELEASE] = [public_key_text(k.public_key()) for k in release]
    if director is not None:
        by_role[KeyRole.DIRECTOR] = [public_key_text(k.public_key()) for k in director]
    return TrustedKeys.from_text(by_role)


TRUSTED = pin(release=[RELEASE], director=[DIRECTOR])


def signed_pair(
    *, manifest: dict[str, Any] | None = None, directive: dict[str, Any] | None = None
) -> tuple[SignedEnvelope, SignedEnvelope]:
    """A manifest envelope (release key) and a directive envelope (director key) pinning it."""
    manifest_env = sign_envelope(make_manifest(**(manifest or {})), RELEASE)
    directive_fields: dict[str, Any] = {"manifest_sha256": envelope_digest(manifest_env), **(directive or {})}
    directive_env = sign_envelope(make_directive(**directive_fields), DIRECTOR)
    return manifest_env, directive_env


def check_directive(
    directive_env: SignedEnvelope, manifest_env: SignedEnvelope, *, trusted: TrustedKeys = TRUSTED, **kwargs: Any
) -> Any:
    options: dict[str, Any] = {"now": NOW, "device_id": DEVICE, "min_seq": 0}
    options.update(kwargs)
    return verify_directive(directive_env, trusted, manifest_envelope=manifest_env, **options)


def with_signed(envelope: SignedEnvelope, signed: dict[str, Any]) -> SignedEnvelope:
    return dataclasses.replace(envelope, signed=signed)


def with_sig(envelope: SignedEnvelope, sig: str, keyid: str | None = None) -> SignedEnvelope:
    first = envelope.signatures[0]
    return dataclasses.replace(envelope, signatures=(Signature(keyid=keyid or first.keyid, sig=sig),))


# -- happy paths -----------------------------------------------------------------------


def test_sign_and_verify_manifest() -> None:
    manifest = make_manifest()
    envelope = sign_envelope(manifest, RELEASE)
    assert envelope.signed == encode(manifest)
    (signature,) = envelope.signatures
    assert signature.keyid == key_id(RELEASE.public_key())
    assert len(base64.b64decode(signature.sig, validate=True)) == 64
    assert verify_manifest(envelope, TRUSTED, now=NOW) == manifest
    assert verify_manifest(envelope, TRUSTED, now=NOW, min_release_counter=manifest.release_counter) == manifest


def test_sign_and_verify_directive() -> None:
    manifest_env, directive_env = signed_pair()
    directive = check_directive(directive_env, manifest_env, min_seq=12)
    assert directive == make_directive(envelope_digest(manifest_env))
    assert directive.manifest_sha256 == canonical_digest(encode(make_manifest()))


def test_signed_pair_survives_the_wire() -> None:
    """Envelopes travel inside a DesiredState payload; decoding must not disturb what the signature covers."""
    manifest_env, directive_env = signed_pair()
    payload = encode_payload(DesiredState(v=1, directive=directive_env, manifest=manifest_env))
    desired = decode_payload(TopicKind.DESIRED, payload)
    manifest = verify_manifest(desired.manifest, TRUSTED, now=NOW)
    assert manifest == make_manifest()
    assert check_directive(desired.directive, desired.manifest).device_id == DEVICE


def test_key_order_of_the_transmitted_json_does_not_matter() -> None:
    manifest_env, _ = signed_pair()
    reordered = json.loads(json.dumps(_reverse_keys(encode(manifest_env))))
    assert list(reordered["signed"]) != list(manifest_env.signed)
    envelope = SignedEnvelope(
        signed=reordered["signed"], signatures=tuple(Signature(**s) for s in reordered["signatures"])
    )
    assert verify_manifest(envelope, TRUSTED, now=NOW) == make_manifest()


def _reverse_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _reverse_keys(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [_reverse_keys(v) for v in value]
    return value


def test_trust_errors_share_one_base() -> None:
    for error in (SignatureError, ExpiredError, ReplayError, IntegrityError):
        assert issubclass(error, TrustError)
    assert not issubclass(ProtocolError, TrustError)


# -- tampering with the signed part --------------------------------------------------------


def _tampered_manifests() -> list[tuple[str, dict[str, Any]]]:
    base = encode(make_manifest())
    cases = []

    def case(name: str, mutate: Any) -> None:
        signed = copy.deepcopy(base)
        mutate(signed)
        cases.append((name, signed))

    case("version", lambda s: s.update(version=s["version"] + 1))
    case("release_counter", lambda s: s.update(release_counter=10**6))
    case("expires", lambda s: s.update(expires=s["expires"] + 10 * 365 * DAY))
    case("model name", lambda s: s.update(model="evil-net"))
    case("model sha256", lambda s: s["files"][0].update(sha256="00" * 32))
    case("model size", lambda s: s["files"][0].update(size=s["files"][0]["size"] - 1))
    case("chunk digest", lambda s: s["files"][0]["chunks"].__setitem__(1, "11" * 32))
    case("eval sha256", lambda s: s["files"][1].update(sha256="22" * 32))
    case("reference accuracy", lambda s: s["reference"].update(accuracy=0.1))
    case("flipped character", lambda s: s.update(profile=s["profile"][:-1] + chr(ord(s["profile"][-1]) ^ 1)))
    case("int to float", lambda s: s.update(version=float(s["version"])))
    case("added key", lambda s: s.update(extra=1))
    case("removed key", lambda s: s.pop("quantization"))
    case("swapped files", lambda s: s.update(files=list(reversed(s["files"]))))
    return cases


@pytest.mark.parametrize(("what", "signed"), _tampered_manifests(), ids=[c[0] for c in _tampered_manifests()])
def test_changed_field_in_signed_manifest_is_a_signature_error(what: str, signed: dict[str, Any]) -> None:
    manifest_env, _ = signed_pair()
    assert canonical_json(signed) != canonical_json(manifest_env.signed)
    with pytest.raises(SignatureError):
        verify_manifest(with_signed(manifest_env, signed), TRUSTED, now=NOW)


@pytest.mark.parametrize("field", ["device_id", "deployment_id", "seq", "expires", "manifest_sha256", "gates"])
def test_changed_field_in_signed_directive_is_a_signature_error(field: str) -> None:
    manifest_env, directive_env = signed_pair()
    replacement = {
        "device_id": "pi-garage-02",
        "deployment_id": "dep-666",
        "seq": 10**9,
        "expires": NOW + 3650 * DAY,
        "manifest_sha256": "00" * 32,
        "gates": {"min_accuracy": 0.0, "max_p95_ms": None},
    }[field]
    signed = {**directive_env.signed, field: replacement}
    with pytest.raises(SignatureError):
        check_directive(with_signed(directive_env, signed), manifest_env)


@settings(max_examples=100)
@given(data=st.data())
def test_any_top_level_change_to_a_signed_manifest_is_a_signature_error(data: st.DataObject) -> None:
    manifest_env, _ = signed_pair()
    key = data.draw(st.sampled_from(sorted(manifest_env.signed)))
    original = canonical_json(manifest_env.signed[key])
    value = data.draw(json_values.filter(lambda v: canonical_json(v) != original))
    tampered = with_signed(manifest_env, {**manifest_env.signed, key: value})
    with pytest.raises(SignatureError):
        verify_manifest(tampered, TRUSTED, now=NOW)


@pytest.mark.parametrize("position", [0, 1, 17, 31, 32, 63])
def test_flipped_byte_in_signature_is_a_signature_error(position: int) -> None:
    manifest_env, directive_env = signed_pair()
    for envelope, verify in (
        (manifest_env, lambda e: verify_manifest(e, TRUSTED, now=NOW)),
        (directive_env, lambda e: check_directive(e, manifest_env)),
    ):
        raw = bytearray(base64.b64decode(envelope.signatures[0].sig))
        raw[position] ^= 0x01
        with pytest.raises(SignatureError):
            verify(with_sig(envelope, base64.b64encode(bytes(raw)).decode()))


# -- wrong, missing or unpinned keys ----------------------------------------------------------


def test_manifest_signed_by_an_unpinned_key_is_a_signature_error() -> None:
    envelope = sign_envelope(make_manifest(), ATTACKER)
    with pytest.raises(SignatureError):
        verify_manifest(envelope, TRUSTED, now=NOW)


def test_signature_by_wrong_key_under_a_pinned_keyid_is_a_signature_error() -> None:
    """The attacker claims the release key's id; the keyid is a lookup hint, not a credential."""
    forged = sign_envelope(make_manifest(), ATTACKER)
    forged = with_sig(forged, forged.signatures[0].sig, keyid=key_id(RELEASE.public_key()))
    with pytest.raises(SignatureError):
        verify_manifest(forged, TRUSTED, now=NOW)


def test_directive_signed_by_an_unpinned_key_is_a_signature_error() -> None:
    manifest_env, _ = signed_pair()
    forged = sign_envelope(make_directive(envelope_digest(manifest_env)), ATTACKER)
    with pytest.raises(SignatureError):
        check_directive(forged, manifest_env)


@pytest.mark.parametrize("which", ["manifest", "directive"])
def test_missing_signature_is_a_signature_error(which: str) -> None:
    manifest_env, directive_env = signed_pair()
    if which == "manifest":
        with pytest.raises(SignatureError):
            verify_manifest(dataclasses.replace(manifest_env, signatures=()), TRUSTED, now=NOW)
    else:
        with pytest.raises(SignatureError):
            check_directive(dataclasses.replace(directive_env, signatures=()), manifest_env)


@pytest.mark.parametrize(
    "trusted",
    [
        TrustedKeys(),
        TrustedKeys({KeyRole.RELEASE: {}, KeyRole.DIRECTOR: {}}),
        pin(release=[], director=[]),
        pin(director=[DIRECTOR]),
    ],
    ids=["nothing", "empty-maps", "empty-lists", "director-only"],
)
def test_no_pinned_release_key_fails_closed(trusted: TrustedKeys) -> None:
    manifest_env, _ = signed_pair()
    with pytest.raises(SignatureError):
        verify_manifest(manifest_env, trusted, now=NOW)


@pytest.mark.parametrize(
    "trusted",
    [TrustedKeys(), pin(release=[RELEASE]), pin(release=[RELEASE], director=[])],
    ids=["nothing", "release-only", "empty-director"],
)
def test_no_pinned_director_key_fails_closed(trusted: TrustedKeys) -> None:
    manifest_env, directive_env = signed_pair()
    with pytest.raises(SignatureError):
        check_directive(directive_env, manifest_env, trusted=trusted)


def test_manifest_signed_with_the_director_key_is_a_signature_error() -> None:
    """Uptane's split: the online director key alone cannot vouch for model bytes."""
    envelope = sign_envelope(make_manifest(), DIRECTOR)
    with pytest.raises(SignatureError):
        verify_manifest(envelope, TRUSTED, now=NOW)


def test_directive_signed_with_the_release_key_is_a_signature_error() -> None:
    manifest_env, _ = signed_pair()
    envelope = sign_envelope(make_directive(envelope_digest(manifest_env)), RELEASE)
    with pytest.raises(SignatureError):
        check_directive(envelope, manifest_env)


def test_signed_manifest_with_malformed_content_is_a_signature_error() -> None:
    """A validly signed but unparseable manifest is refused as untrustworthy, not crashed on."""
    for signed in ({"v": 1}, {**encode(make_manifest()), "v": 2}, {**encode(make_manifest()), "extra": 1}):
        signature = base64.b64encode(RELEASE.sign(canonical_json(signed))).decode()
        envelope = SignedEnvelope(signed=signed, signatures=(Signature(key_id(RELEASE.public_key()), signature),))
        with pytest.raises(SignatureError):
            verify_manifest(envelope, TRUSTED, now=NOW)


@pytest.mark.parametrize("hostile", ["\ud800", float("nan"), float("inf")], ids=["lone-surrogate", "nan", "inf"])
def test_signed_part_that_cannot_be_canonicalised_is_a_signature_error(hostile: Any) -> None:
    """Attacker-controlled ``signed`` content must end in a SignatureError, not crash verification.

    decode_payload lets both through today (see test_codec_messages), so this is reachable from the wire.
    """
    manifest_env, directive_env = signed_pair()
    tampered = with_signed(manifest_env, {**manifest_env.signed, "model": hostile})
    with pytest.raises(SignatureError):
        verify_manifest(tampered, TRUSTED, now=NOW)
    tampered = with_signed(directive_env, {**directive_env.signed, "rollout_id": hostile})
    with pytest.raises(SignatureError):
        check_directive(tampered, manifest_env)


# -- expiry, replay, binding ---------------------------------------------------------------


@pytest.mark.parametrize("expires", [NOW, NOW - 1, NOW - 365 * DAY])
def test_expired_manifest_is_an_expired_error(expires: int) -> None:
    envelope = sign_envelope(make_manifest(expires=expires), RELEASE)
    with pytest.raises(ExpiredError):
        verify_manifest(envelope, TRUSTED, now=NOW)


def test_manifest_valid_until_its_expiry() -> None:
    envelope = sign_envelope(make_manifest(expires=NOW + 1), RELEASE)
    assert verify_manifest(envelope, TRUSTED, now=NOW).expires == NOW + 1
    with pytest.raises(ExpiredError):
        verify_manifest(envelope, TRUSTED, now=NOW + 1)
    with pytest.raises(ExpiredError):
        verify_manifest(envelope, TRUSTED, now=NOW + 0.5 + 0.5)


@pytest.mark.parametrize("expires", [NOW, NOW - 1, NOW - 365 * DAY])
def test_expired_directive_is_an_expired_error(expires: int) -> None:
    manifest_env, directive_env = signed_pair(directive={"expires": expires})
    with pytest.raises(ExpiredError):
        check_directive(directive_env, manifest_env)


def test_directive_valid_until_its_expiry() -> None:
    manifest_env, directive_env = signed_pair(directive={"expires": NOW + 1})
    assert check_directive(directive_env, manifest_env).expires == NOW + 1
    with pytest.raises(ExpiredError):
        check_directive(directive_env, manifest_env, now=NOW + 1)


def test_lower_release_counter_is_a_replay_error() -> None:
    envelope = sign_envelope(make_manifest(release_counter=7), RELEASE)
    with pytest.raises(ReplayError):
        verify_manifest(envelope, TRUSTED, now=NOW, min_release_counter=8)
    assert verify_manifest(envelope, TRUSTED, now=NOW, min_release_counter=7).release_counter == 7
    assert verify_manifest(envelope, TRUSTED, now=NOW, min_release_counter=0).release_counter == 7


def test_lower_directive_seq_is_a_replay_error() -> None:
    manifest_env, directive_env = signed_pair(directive={"seq": 12})
    with pytest.raises(ReplayError):
        check_directive(directive_env, manifest_env, min_seq=13)
    assert check_directive(directive_env, manifest_env, min_seq=12).seq == 12


@settings(max_examples=100)
@given(counter=st.integers(0, 2**40), trusted_counter=st.integers(0, 2**40))
def test_release_counter_replay_property(counter: int, trusted_counter: int) -> None:
    envelope = sign_envelope(make_manifest(release_counter=counter), RELEASE)
    if counter < trusted_counter:
        with pytest.raises(ReplayError):
            verify_manifest(envelope, TRUSTED, now=NOW, min_release_counter=trusted_counter)
    else:
        assert (
            verify_manifest(envelope, TRUSTED, now=NOW, min_release_counter=trusted_counter).release_counter == counter
        )


def test_directive_for_another_device_is_a_target_error() -> None:
    manifest_env, directive_env = signed_pair(directive={"device_id": "pi-garage-02"})
    with pytest.raises(TargetError, match="directive is for device pi-garage-02"):
        check_directive(directive_env, manifest_env)
    assert check_directive(directive_env, manifest_env, device_id="pi-garage-02").device_id == "pi-garage-02"


def test_directive_pinning_a_different_manifest_is_a_signature_error() -> None:
    """A stolen director key cannot point a device at another (older, validly signed) manifest."""
    manifest_env, directive_env = signed_pair()
    other_manifest = sign_envelope(make_manifest(version=2, release_counter=6), RELEASE)
    assert verify_manifest(other_manifest, TRUSTED, now=NOW).version == 2  # the other one is genuine
    with pytest.raises(SignatureError):
        check_directive(directive_env, other_manifest)
    _, random_pin = signed_pair(directive={"manifest_sha256": "ab" * 32})
    with pytest.raises(SignatureError):
        check_directive(random_pin, manifest_env)


def test_directive_pins_the_signed_part_not_the_signatures() -> None:
    """Re-signing the same manifest with a rotated key keeps the directive valid."""
    manifest_env, directive_env = signed_pair()
    resigned = sign_envelope(make_manifest(), RELEASE_NEXT)
    assert envelope_digest(resigned) == envelope_digest(manifest_env)
    assert check_directive(directive_env, resigned).seq == 12


# -- key rotation ----------------------------------------------------------------------------


def test_two_pinned_release_keys_either_verifies() -> None:
    trusted = pin(release=[RELEASE, RELEASE_NEXT], director=[DIRECTOR, DIRECTOR_NEXT])
    for release_key in (RELEASE, RELEASE_NEXT):
        manifest_env = sign_envelope(make_manifest(), release_key)
        assert verify_manifest(manifest_env, trusted, now=NOW) == make_manifest()
        for director_key in (DIRECTOR, DIRECTOR_NEXT):
            directive_env = sign_envelope(make_directive(envelope_digest(manifest_env)), director_key)
            assert check_directive(directive_env, manifest_env, trusted=trusted).device_id == DEVICE
    with pytest.raises(SignatureError):
        verify_manifest(sign_envelope(make_manifest(), ATTACKER), trusted, now=NOW)


def test_rotated_out_key_no_longer_verifies() -> None:
    manifest_env = sign_envelope(make_manifest(), RELEASE)
    with pytest.raises(SignatureError):
        verify_manifest(manifest_env, pin(release=[RELEASE_NEXT], director=[DIRECTOR]), now=NOW)


def test_one_good_signature_among_bad_ones_suffices() -> None:
    good = sign_envelope(make_manifest(), RELEASE_NEXT)
    bad_by_attacker = sign_envelope(make_manifest(), ATTACKER).signatures[0]
    bad_garbage = Signature(keyid=key_id(RELEASE.public_key()), sig="!!not base64!!")
    envelope = dataclasses.replace(good, signatures=(bad_by_attacker, bad_garbage, *good.signatures))
    trusted = pin(release=[RELEASE, RELEASE_NEXT])
    assert verify_manifest(envelope, trusted, now=NOW) == make_manifest()
    only_bad = dataclasses.replace(good, signatures=(bad_by_attacker, bad_garbage))
    with pytest.raises(SignatureError):
        verify_manifest(only_bad, trusted, now=NOW)


@pytest.mark.parametrize(
    "sig",
    ["", "!!!!", "not base64 at all", "AAAA", "A", "====", "QUJD\n", "é" * 8, "A" * 86, "A" * 88, "A" * 4000],
    ids=repr,
)
def test_garbage_base64_in_sig_is_a_signature_error(sig: str) -> None:
    manifest_env, directive_env = signed_pair()
    with pytest.raises(SignatureError):
        verify_manifest(with_sig(manifest_env, sig), TRUSTED, now=NOW)
    with pytest.raises(SignatureError):
        check_directive(with_sig(directive_env, sig), manifest_env)


def test_signature_over_non_canonical_bytes_does_not_verify() -> None:
    """The signature covers canonical JSON, not whatever pretty form the signer might have used."""
    manifest = encode(make_manifest())
    pretty = json.dumps(manifest, indent=2).encode()
    sig = base64.b64encode(RELEASE.sign(pretty)).decode()
    envelope = SignedEnvelope(signed=manifest, signatures=(Signature(key_id(RELEASE.public_key()), sig),))
    with pytest.raises(SignatureError):
        verify_manifest(envelope, TRUSTED, now=NOW)


# -- key material ----------------------------------------------------------------------------------


def test_key_text_and_pem_round_trip() -> None:
    public = RELEASE.public_key()
    assert key_id(public_key_from_text(public_key_text(public))) == key_id(public)
    assert len(key_id(public)) == 64
    restored = private_key_from_pem(private_key_pem(RELEASE))
    assert key_id(restored.public_key()) == key_id(public)


@pytest.mark.parametrize("text", ["", "garbage!!", "AAAA", base64.b64encode(b"\x00" * 31).decode(), "é"], ids=repr)
def test_bad_public_key_text_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError):
        public_key_from_text(text)
    with pytest.raises(ConfigError):
        TrustedKeys.from_text({KeyRole.RELEASE: [text]})


def test_bad_private_key_pem_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        private_key_from_pem(b"not a pem")
    ec_pem = generate_private_key(SECP256R1()).private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    with pytest.raises(ConfigError):
        private_key_from_pem(ec_pem)


# -- canonical JSON ------------------------------------------------------------------------------


def test_canonical_json_known_vector() -> None:
    value = {"b": 1, "a": [1, 2.5, {"d": None, "c": "é"}], "e": True}
    assert canonical_json(value) == '{"a":[1,2.5,{"c":"é","d":null}],"b":1,"e":true}'.encode()


def _shuffled(data: st.DataObject, value: Any) -> Any:
    if isinstance(value, dict):
        keys = data.draw(st.permutations(list(value)))
        return {k: _shuffled(data, value[k]) for k in keys}
    if isinstance(value, list):
        return [_shuffled(data, v) for v in value]
    return value


@settings(max_examples=200)
@given(value=json_objects, data=st.data())
def test_canonical_json_is_key_order_independent_and_stable(value: dict[str, Any], data: st.DataObject) -> None:
    encoded = canonical_json(value)
    assert canonical_json(_shuffled(data, value)) == encoded
    assert canonical_json(json.loads(encoded)) == encoded  # parse + re-encode is a fixed point
    assert canonical_digest(_shuffled(data, value)) == canonical_digest(value)
    assert json.loads(encoded) == value
    assert b"\n" not in encoded


@settings(max_examples=50)
@given(data=st.data())
def test_signature_survives_any_key_order(data: st.DataObject) -> None:
    manifest_env, directive_env = signed_pair()
    shuffled_manifest = with_signed(manifest_env, _shuffled(data, manifest_env.signed))
    assert verify_manifest(shuffled_manifest, TRUSTED, now=NOW) == make_manifest()
    shuffled_directive = with_signed(directive_env, _shuffled(data, directive_env.signed))
    assert check_directive(shuffled_directive, shuffled_manifest).seq == 12


@pytest.mark.parametrize("value", [float("nan"), float("inf"), {"x": float("-inf")}, {1: 2j}, object(), b"bytes"])
def test_non_json_values_are_protocol_errors(value: Any) -> None:
    with pytest.raises(ProtocolError):
        canonical_json(value)


@pytest.mark.parametrize("value", ["\ud800", {"k": "x\udfff"}, {"\udc00": 1}], ids=repr)
def test_lone_surrogates_are_protocol_errors_not_unicode_errors(value: Any) -> None:
    with pytest.raises(ProtocolError):
        canonical_json(value)

"""The signed root of trust: one test per verification rule, each asserting the exact error."""

from __future__ import annotations

import dataclasses

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.codec import encode
from shared.errors import ChainError, ExpiredError, ReplayError, SignatureError
from shared.messages import Manifest, RootChain, Signature, SignedEnvelope, decode_payload, encode_payload
from shared.root import Root, update_root, verify_root_self, verify_root_update
from shared.signing import KeyRole, add_signatures, key_id, public_key_text, sign_envelope, verify_manifest
from shared.topics import TopicKind
from tests.shared.factories import DAY, NOW, make_manifest, make_root

Key = Ed25519PrivateKey


def new_keys(n: int) -> list[Key]:
    return [Ed25519PrivateKey.generate() for _ in range(n)]


def signed(root: Root, *keys: Key) -> SignedEnvelope:
    return sign_envelope(root, *keys)


@pytest.fixture
def trust() -> dict[str, list[Key]]:
    return {"root": new_keys(1), "release": new_keys(1), "director": new_keys(1)}


def v1(trust: dict[str, list[Key]]) -> tuple[Root, SignedEnvelope]:
    root = make_root(1, **trust)
    return root, signed(root, *trust["root"])


# -- the happy paths -------------------------------------------------------------------


def test_a_root_signed_by_the_old_and_the_new_root_keys_is_the_next_one(trust: dict[str, list[Key]]) -> None:
    old, _ = v1(trust)
    new_root_key = new_keys(1)
    nxt = make_root(2, root=new_root_key, release=trust["release"], director=trust["director"])
    assert verify_root_update(old, signed(nxt, *trust["root"], *new_root_key)) == nxt


def test_a_chain_is_walked_one_version_at_a_time_to_its_newest(trust: dict[str, list[Key]]) -> None:
    old, old_env = v1(trust)
    release2 = new_keys(1)
    v2 = make_root(2, root=trust["root"], release=[*trust["release"], *release2], director=trust["director"])
    v3 = make_root(3, root=trust["root"], release=release2, director=trust["director"])
    chain = [old_env, signed(v2, *trust["root"]), signed(v3, *trust["root"])]
    update = update_root(old, old_env, chain, now=NOW)
    assert update is not None and update.root == v3 and update.envelope == chain[2]
    # from v2 on, the same chain skips the history it already walked
    assert update_root(v2, chain[1], chain, now=NOW) == update


def test_the_trusted_root_delivered_again_is_no_update(trust: dict[str, list[Key]]) -> None:
    old, old_env = v1(trust)
    assert update_root(old, old_env, [old_env], now=NOW) is None


def test_role_keys_and_thresholds_become_the_trusted_keys(trust: dict[str, list[Key]]) -> None:
    release = new_keys(2)
    root = make_root(1, root=trust["root"], release=release, director=trust["director"], thresholds={"release": 2})
    keys = root.trusted_keys()
    assert set(keys.keys[KeyRole.RELEASE]) == {key_id(k.public_key()) for k in release}
    assert keys.threshold(KeyRole.RELEASE) == 2 and keys.threshold(KeyRole.DIRECTOR) == 1
    manifest = make_manifest()
    one = sign_envelope(manifest, release[0])
    with pytest.raises(SignatureError) as exc:
        verify_manifest(one, keys, now=NOW)
    assert str(exc.value) == "1 valid signature(s) by pinned release keys, below the threshold of 2"
    both = add_signatures(one, [release[1]])
    assert verify_manifest(both, keys, now=NOW) == manifest


def test_a_threshold_counts_distinct_keys_not_signatures(trust: dict[str, list[Key]]) -> None:
    release = new_keys(2)
    root = make_root(1, root=trust["root"], release=release, director=trust["director"], thresholds={"release": 2})
    one = sign_envelope(make_manifest(), release[0])
    twice = dataclasses.replace(one, signatures=one.signatures * 2)  # the same key's signature, copied
    with pytest.raises(SignatureError) as exc:
        verify_manifest(twice, root.trusted_keys(), now=NOW)
    assert str(exc.value) == "1 valid signature(s) by pinned release keys, below the threshold of 2"


# -- every refusal, with its exact message ---------------------------------------------------


def test_not_chained_a_root_signed_only_by_unknown_keys(trust: dict[str, list[Key]]) -> None:
    old, _ = v1(trust)
    attacker = new_keys(1)
    forged = make_root(2, root=attacker, release=attacker, director=attacker)
    with pytest.raises(ChainError) as exc:
        verify_root_update(old, signed(forged, *attacker))
    assert str(exc.value) == "root v2 does not chain from the trusted root v1: no valid signature by its root keys"


def test_not_chained_a_bad_signature_by_the_trusted_root_key(trust: dict[str, list[Key]]) -> None:
    old, _ = v1(trust)
    nxt = make_root(2, **trust)
    envelope = signed(nxt, *trust["root"])
    tampered = SignedEnvelope(signed={**envelope.signed, "expires": NOW + 999 * DAY}, signatures=envelope.signatures)
    with pytest.raises(ChainError) as exc:
        verify_root_update(old, tampered)
    assert str(exc.value) == "root v2 does not chain from the trusted root v1: no valid signature by its root keys"


def test_below_the_trusted_roots_threshold(trust: dict[str, list[Key]]) -> None:
    roots = new_keys(2)
    old = make_root(1, root=roots, release=trust["release"], director=trust["director"], thresholds={"root": 2})
    nxt = make_root(2, root=roots, release=trust["release"], director=trust["director"])
    with pytest.raises(SignatureError) as exc:
        verify_root_update(old, signed(nxt, roots[0]))
    assert str(exc.value) == (
        "root v2 has 1 valid signature(s) by the trusted root v1's root keys, below its threshold of 2"
    )


def test_below_its_own_threshold_a_new_root_key_that_did_not_sign(trust: dict[str, list[Key]]) -> None:
    old, _ = v1(trust)
    new_root_key = new_keys(1)
    nxt = make_root(2, root=new_root_key, release=trust["release"], director=trust["director"])
    with pytest.raises(SignatureError) as exc:
        verify_root_update(old, signed(nxt, *trust["root"]))  # the old key alone
    assert str(exc.value) == "root v2 has 0 valid signature(s) by its own root keys, below its threshold of 1"


def test_a_lower_version_is_refused(trust: dict[str, list[Key]]) -> None:
    v2 = make_root(2, **trust)
    v1_env = signed(make_root(1, **trust), *trust["root"])
    with pytest.raises(ReplayError) as exc:
        verify_root_update(v2, v1_env)
    assert str(exc.value) == "root version 1 is not newer than the trusted version 2"
    with pytest.raises(ReplayError) as exc:
        update_root(v2, signed(v2, *trust["root"]), [v1_env], now=NOW)
    assert str(exc.value) == "root version 1 is not newer than the trusted version 2"


def test_an_equal_version_with_other_content_is_refused(trust: dict[str, list[Key]]) -> None:
    old, old_env = v1(trust)
    attacker = new_keys(1)
    other = make_root(1, root=trust["root"], release=attacker, director=trust["director"])
    other_env = signed(other, *trust["root"])  # validly signed, still never applied
    with pytest.raises(ReplayError) as exc:
        update_root(old, old_env, [other_env], now=NOW)
    assert str(exc.value) == "root version 1 is not newer than the trusted version 1"
    with pytest.raises(ReplayError) as exc:
        verify_root_update(old, other_env)
    assert str(exc.value) == "root version 1 is not newer than the trusted version 1"


def test_a_skipped_version_is_refused(trust: dict[str, list[Key]]) -> None:
    old, old_env = v1(trust)
    v3 = make_root(3, **trust)
    with pytest.raises(ChainError) as exc:
        update_root(old, old_env, [old_env, signed(v3, *trust["root"])], now=NOW)
    assert str(exc.value) == "root version 3 skips a version: the trusted root is v1, the next must be v2"


def test_an_expired_final_root_is_refused_freeze(trust: dict[str, list[Key]]) -> None:
    old, old_env = v1(trust)
    v2 = make_root(2, **trust, expires=NOW - 1)
    with pytest.raises(ExpiredError) as exc:
        update_root(old, old_env, [old_env, signed(v2, *trust["root"])], now=NOW)
    assert str(exc.value) == f"root v2 expired at {NOW - 1}"


def test_an_expired_root_on_the_way_to_a_fresh_one_is_fine(trust: dict[str, list[Key]]) -> None:
    old, old_env = v1(trust)
    v2 = make_root(2, **trust, expires=NOW - 1)
    v3 = make_root(3, **trust)
    update = update_root(old, old_env, [signed(v2, *trust["root"]), signed(v3, *trust["root"])], now=NOW)
    assert update is not None and update.root.version == 3


@pytest.mark.parametrize(
    ("change", "detail"),
    [
        (lambda s: {**s, "type": "manifest"}, "$: type must be 'root', got 'manifest'"),
        (lambda s: {**s, "version": 0}, "$: version must be at least 1, got 0"),
        (lambda s: {**s, "extra": 1}, "$: unknown keys ['extra']"),
        (lambda s: {k: v for k, v in s.items() if k != "expires"}, "$: missing key 'expires'"),
        (lambda s: {**s, "roles": {k: v for k, v in s["roles"].items() if k != "director"}},
         "$: roles must be exactly root, release, director; got release, root"),
        (lambda s: {**s, "roles": {**s["roles"], "release": {**s["roles"]["release"], "threshold": 0}}},
         "$.roles.release: threshold must be at least 1, got 0"),
        (lambda s: {**s, "roles": {**s["roles"], "release": {**s["roles"]["release"], "threshold": 2}}},
         "$.roles.release: threshold 2 exceeds the role's 1 key(s)"),
        (lambda s: {**s, "roles": {**s["roles"], "release": {"keyids": ["ab" * 32], "threshold": 1}}},
         f"$: role release names unlisted key(s) {'ab' * 32}"),
    ],
    ids=["type", "version", "unknown-key", "missing-key", "roles", "threshold-0", "threshold-unsatisfiable",
         "unlisted-key"],
)
def test_a_malformed_root_is_refused(trust: dict[str, list[Key]], change: object, detail: str) -> None:
    old, _ = v1(trust)
    body = encode(make_root(2, **trust))
    assert callable(change)
    envelope = add_signatures(SignedEnvelope(signed=change(body), signatures=()), trust["root"])
    with pytest.raises(SignatureError) as exc:
        verify_root_update(old, envelope)
    assert str(exc.value) == f"root of trust is malformed: {detail}"


def test_a_key_listed_under_another_keys_id_is_malformed(trust: dict[str, list[Key]]) -> None:
    """Else one key could be listed twice and count twice towards a threshold."""
    body = encode(make_root(1, **trust))
    release_id = key_id(trust["release"][0].public_key())
    body["keys"][release_id] = public_key_text(trust["director"][0].public_key())
    envelope = add_signatures(SignedEnvelope(signed=body, signatures=()), trust["root"])
    with pytest.raises(SignatureError) as exc:
        verify_root_self(envelope)
    assert str(exc.value).startswith(f"root of trust is malformed: $: key id {release_id} does not match its key")


def test_an_empty_chain_is_malformed(trust: dict[str, list[Key]]) -> None:
    old, old_env = v1(trust)
    with pytest.raises(SignatureError) as exc:
        update_root(old, old_env, [], now=NOW)
    assert str(exc.value) == "root of trust is malformed: the chain is empty"


def test_an_initial_root_must_be_signed_by_its_own_root_keys(trust: dict[str, list[Key]]) -> None:
    root, envelope = v1(trust)
    assert verify_root_self(envelope) == root
    with pytest.raises(SignatureError) as exc:
        verify_root_self(signed(root, *trust["release"]))
    assert str(exc.value) == "root v1 has 0 valid signature(s) by its own root keys, below its threshold of 1"


def test_a_signature_that_is_not_base64_counts_for_nothing(trust: dict[str, list[Key]]) -> None:
    old, _ = v1(trust)
    nxt = make_root(2, **trust)
    envelope = SignedEnvelope(signed=encode(nxt), signatures=(Signature(keyid=key_id(trust["root"][0].public_key()),
                                                                         sig="not base64!"),))
    with pytest.raises(ChainError):
        verify_root_update(old, envelope)


# -- on the wire ------------------------------------------------------------------------


def test_the_chain_round_trips_on_the_root_topic(trust: dict[str, list[Key]]) -> None:
    _, envelope = v1(trust)
    chain = RootChain(v=1, roots=(envelope,))
    assert decode_payload(TopicKind.ROOT, encode_payload(chain)) == chain


def test_a_manifest_is_not_a_root(trust: dict[str, list[Key]]) -> None:
    old, _ = v1(trust)
    manifest: Manifest = make_manifest()
    with pytest.raises(SignatureError) as exc:
        verify_root_update(old, sign_envelope(manifest, *trust["root"]))
    assert str(exc.value).startswith("root of trust is malformed: ")

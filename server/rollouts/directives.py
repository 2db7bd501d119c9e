"""What a device is sent: its signed directive beside the release's signed manifest.
"""

from __future__ import annotations

from typing import Any

from server.db.models import Deployment
from server.keys import SigningKeys
from server.rollouts.policy import RolloutPolicy
from server.rollouts.states import DeploymentKind
from shared import PROTOCOL_VERSION
from shared.codec import decode, encode
from shared.messages import DesiredState, Directive, Gates, SignedEnvelope, encode_payload
from shared.signing import key_id, sign_envelope

DIRECTIVE_LIFETIME_S = 7 * 24 * 3600


def directive_gates(deployment: Deployment) -> Gates:
    """An install is checked against the floor and the model it replaces; a revert only has to run."""
    if deployment.kind == DeploymentKind.REVERT.value:
        return Gates(min_accuracy=0.0)
    policy = RolloutPolicy.from_json(deployment.rollout.policy)
    return Gates(
        min_accuracy=deployment.min_accuracy_gate,
        max_p95_ms=policy.max_p95_ms,
        max_regression=policy.max_regression,
        max_latency_ratio=policy.max_latency_ratio,
        latency_slack_ms=policy.latency_slack_ms or None,  # none: the directive older agents have always read
    )


def sign_directive(deployment: Deployment, keys: SigningKeys, now: float) -> None:
    directive = Directive(
        v=PROTOCOL_VERSION,
        device_id=deployment.device_id,
        deployment_id=deployment.id,
        rollout_id=deployment.rollout_id,
        manifest_sha256=deployment.release.manifest_sha256,
        seq=deployment.seq,
        gates=directive_gates(deployment),
        issued=int(now),
        expires=int(now) + DIRECTIVE_LIFETIME_S,
    )
    deployment.directive = encode(sign_envelope(directive, keys.director))


def fresh_directive(deployment: Deployment, keys: SigningKeys, now: float) -> None:
    """Sign the directive, or sign it again when it is past half its lifetime or was signed by another
    director key (rotated: the old one may be revoked next)."""
    directive: dict[str, Any] | None = deployment.directive
    if (directive is None or directive["signed"]["expires"] - now < DIRECTIVE_LIFETIME_S / 2
            or [s["keyid"] for s in directive["signatures"]] != [key_id(keys.director.public_key())]):
        sign_directive(deployment, keys, now)


def desired_payload(deployment: Deployment) -> bytes:
    assert deployment.directive is not None
    desired = DesiredState(
        v=PROTOCOL_VERSION,
        directive=decode(SignedEnvelope, deployment.directive),
        manifest=decode(SignedEnvelope, deployment.release.manifest),
    )
    return encode_payload(desired)

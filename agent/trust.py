"""What the agent checks before it trusts a desired state, and what it remembers once it does.

Both signatures over canonical JSON (release key for the manifest, director
key for the directive), expiry, the device id and profile it is for, and
rollback protection: a release counter and a directive sequence number no
lower than the trusted ones, and a sequence number already used only by the
very deployment that used it.
"""

from __future__ import annotations

from agent.record import TrustedState
from shared.errors import ReplayError
from shared.messages import MAX_ID_LENGTH, DesiredState, Directive, Manifest
from shared.signing import TrustedKeys, verify_directive, verify_manifest


def verify_desired(
    desired: DesiredState, keys: TrustedKeys, trusted: TrustedState, *, device_id: str, profile: str, now: float
) -> tuple[Manifest, Directive]:
    """Every check; raises TrustError. Parses nothing a signature does not cover."""
    manifest = verify_manifest(
        desired.manifest, keys, now=now, min_release_counter=trusted.release_counter, profile=profile
    )
    directive = verify_directive(
        desired.directive, keys, now=now, device_id=device_id, manifest_envelope=desired.manifest,
        min_seq=trusted.directive_seq,
    )
    if directive.seq == trusted.directive_seq and directive.deployment_id != trusted.deployment_id:
        raise ReplayError(f"directive sequence {directive.seq} was already used")
    return manifest, directive


def trusted_after(trusted: TrustedState, manifest: Manifest, directive: Directive) -> TrustedState:
    """The trusted state once this verified pair is accepted (never lower than before)."""
    if directive.seq < trusted.directive_seq:
        return trusted
    return TrustedState(
        release_counter=max(trusted.release_counter, manifest.release_counter),
        directive_seq=directive.seq,
        deployment_id=directive.deployment_id,
    )


def claimed_deployment(desired: DesiredState) -> str:
    """The deployment id an unverified directive claims, if it looks like one: only ever quoted."""
    claim = desired.directive.signed.get("deployment_id")
    if isinstance(claim, str) and len(claim) <= MAX_ID_LENGTH and claim.isprintable():
        return claim
    return ""

"""The one error tree of edgefleet.

::

    EdgefleetError
    ├── ConfigError            bad configuration file or missing key material
    ├── UserInputError         a user's mistake on the command line or in a file
    │   ├── NotFoundError      unknown device, model, version, profile, rollout
    │   └── AlreadyExistsError a name that is taken
    ├── ProtocolError          malformed, oversized or unknown wire message/topic
    ├── TrustError             anything that must stop an install
    │   ├── SignatureError     missing, unknown-key or invalid signature
    │   ├── ExpiredError       metadata past its expiry
    │   ├── ReplayError        lower release counter, directive sequence or root version
    │   ├── ChainError         a root of trust that does not chain from the trusted one
    │   ├── TargetError        metadata for another device or another device profile
    │   └── IntegrityError     size or sha256 of the bytes differs from the manifest
    ├── ModelError             a model that cannot be converted, loaded or run
    │   ├── ModelLoadError     this interpreter cannot load the model (e.g. an op version it lacks)
    │   ├── RuntimeMissingError no TFLite interpreter is installed
    │   ├── OutOfMemoryError   the model needs more memory than the trial may use
    │   └── ModelUnavailableError no model is served yet (none committed, still loading, failed to load)
    ├── TransportError         the broker refused or went away
    ├── InferenceError         the agent's inference endpoint answered with an error (status, detail)
    │   └── EndpointUnreachableError  nothing answers at the endpoint's address
    └── StorageError           the disk is full or a file cannot be written

Third-party exceptions are translated at one boundary per adapter and
re-raised ``from`` the original, so callers only ever catch these.
"""

from __future__ import annotations


class EdgefleetError(Exception):
    """Base of every error edgefleet raises on purpose."""


class ConfigError(EdgefleetError):
    pass


class UserInputError(EdgefleetError):
    pass


class NotFoundError(UserInputError):
    pass


class AlreadyExistsError(UserInputError):
    pass


class AccessDeniedError(UserInputError):
    """A credential (an enrolment token, an API token) that does not grant what was asked: HTTP 403."""


class ProtocolError(EdgefleetError):
    pass


class TrustError(EdgefleetError):
    pass


class SignatureError(TrustError):
    pass


class ExpiredError(TrustError):
    pass


class ReplayError(TrustError):
    pass


class ChainError(TrustError):
    """A new root of trust not signed by the trusted root's keys, or one that skips a version."""


class TargetError(TrustError):
    pass


class IntegrityError(TrustError):
    pass


class ModelError(EdgefleetError):
    pass


class ModelLoadError(ModelError):
    pass


class RuntimeMissingError(ModelError):
    pass


class OutOfMemoryError(ModelError):
    pass


class ModelUnavailableError(ModelError):
    pass


class TransportError(EdgefleetError):
    pass


class InferenceError(EdgefleetError):
    """An error response from the agent's endpoint: ``status`` (HTTP), ``code`` and ``detail`` from its body."""

    def __init__(self, message: str, *, status: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class EndpointUnreachableError(InferenceError):
    pass


class StorageError(EdgefleetError):
    pass


def one_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (at most 300 characters), or its type's name: what
    a clear error quotes of a third-party exception, whose message can be pages of MLIR or a traceback."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[0] if len(lines[0]) <= 300 else lines[0][:299] + "…"

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
    │   ├── ReplayError        lower release counter or directive sequence
    │   ├── TargetError        metadata for another device or another device profile
    │   └── IntegrityError     size or sha256 of the bytes differs from the manifest
    ├── ModelError             a model that cannot be converted, loaded or run
    │   ├── ModelLoadError     this interpreter cannot load the model (e.g. an op version it lacks)
    │   ├── RuntimeMissingError no TFLite interpreter is installed
    │   └── OutOfMemoryError   the model needs more memory than the trial may use
    ├── TransportError         the broker refused or went away
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


class TransportError(EdgefleetError):
    pass


class StorageError(EdgefleetError):
    pass

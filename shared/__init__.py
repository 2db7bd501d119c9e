"""What the server and the agents must agree on.

Topics, message types, the manifest, canonical JSON, signing and
verification, the error tree, and the TFLite runtime adapter and benchmark
both sides measure with. Depends on the standard library, ``cryptography``
and ``paho-mqtt``; numpy and the TFLite interpreter are imported lazily by
``shared.interpreter`` and ``shared.benchmark`` only.
"""

PROTOCOL_VERSION = 1  # the major version: peers of another major refuse each other
# The minor version (shared/protocol.py): only adds optional fields, which peers of an older minor ignore.
# 1: Manifest.threads, serving telemetry (Telemetry.serving).
# 2: benchmark-only trials: the "measure" command (Command.order, Command.manifest), "measurement" telemetry
#    and Telemetry.reason.
# 3: Gates.latency_slack_ms.
PROTOCOL_MINOR = 3

"""Fleet rollouts: planning, the engine, gates, operator control and the read model.

* ``planning.start_rollout`` (the operator's command): resolve the selection,
  build or reuse each profile's variant, sign releases, record waves;
* ``engine.RolloutEngine.tick(now)`` (the server): start waves, measure gates,
  move on, pause or roll back, converge newcomers; publish after commit;
* ``gates``: a wave's gate as pure functions over its devices' reports;
* ``control``: pause, resume, abort, roll back;
* ``read_model``: what status, list, events and the HTTP API show.

Importing this package never imports TensorFlow: planning builds variants
only when a profile is not built yet, and imports the compressor then.
"""

from server.rollouts.control import abort_rollout, pause_rollout, resume_rollout, rollback_rollout
from server.rollouts.directives import DIRECTIVE_LIFETIME_S
from server.rollouts.engine import Outgoing, RolloutEngine
from server.rollouts.planning import start_rollout
from server.rollouts.policy import OnFailure, RolloutPolicy, parse_waves
from server.rollouts.read_model import DeviceStatus, RolloutStatus, list_events, list_rollouts, rollout_status
from server.rollouts.states import SUPERSEDED

__all__ = [
    "DIRECTIVE_LIFETIME_S",
    "SUPERSEDED",
    "DeviceStatus",
    "OnFailure",
    "Outgoing",
    "RolloutEngine",
    "RolloutPolicy",
    "RolloutStatus",
    "abort_rollout",
    "list_events",
    "list_rollouts",
    "parse_waves",
    "pause_rollout",
    "resume_rollout",
    "rollback_rollout",
    "rollout_status",
    "start_rollout",
]

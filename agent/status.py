"""What ``edgefleet agent status`` shows: the agent's data directory, read without changing it.

``read_status`` reads the slots, the active pointer, the update record, the
trusted state and the outbox, each on its own: a corrupt or missing file
spoils only its own part, which then carries an ``error`` instead of its
fields. No broker, no model loaded, nothing written. ``status_lines`` renders
the same for a terminal. The JSON keys are documented on the command
(``agent/cli.py``); keep the two in step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from agent.config import AgentConfig
from agent.files import read_json
from agent.outbox import Outbox
from agent.record import RecordStore
from agent.root import RootTrust, load_saved_root
from agent.slots import SLOTS, SlotStore
from shared.errors import EdgefleetError

SHA_PREFIX = 12
Status = dict[str, Any]


def _guarded(read: Callable[[], Status]) -> Status:
    """One part of the status, or ``{"error": ...}`` when its file cannot be read."""
    try:
        return read()
    except (EdgefleetError, OSError, ValueError) as exc:
        return {"error": str(exc)}


def _slot(slots: SlotStore, name: str, active: str | None) -> Status:
    base: Status = {"slot": name, "active": name == active}
    if not slots.slot_dir(name).exists():
        return {**base, "state": "empty"}
    try:
        manifest = slots.manifest(name)
    except (EdgefleetError, OSError, ValueError) as exc:
        return {**base, "state": "unreadable", "error": f"{slots.slot_dir(name) / 'manifest.json'} is unreadable: {exc}"}
    if manifest is None:
        return {**base, "state": "partial", "error": "no manifest: a half-staged slot, not a usable model"}
    entry = manifest.file("model")
    status: Status = {
        **base,
        "state": "model",
        "model": manifest.model,
        "version": manifest.version,
        "quantization": manifest.quantization,
        "model_sha256": entry.sha256,
        "size_bytes": entry.size,
    }
    path = slots.file_path(name, entry)
    try:
        on_disk = path.stat().st_size
    except OSError as exc:
        return {**status, "error": f"{entry.name} is missing: {exc.strerror or exc}"}
    if on_disk != entry.size:
        return {**status, "error": f"{entry.name} holds {on_disk} bytes, its manifest says {entry.size}"}
    return status


def _committed(slots: SlotStore, active: str, view: Status) -> Status:
    if view["state"] != "model":
        return {"error": f"the active slot {active} holds no readable model ({view.get('error', view['state'])})"}
    keys = ("model", "version", "quantization", "model_sha256", "error")
    return {"slot": active, **{key: view[key] for key in keys if key in view},
            "deployment_id": slots.active_deployment()}


def read_status(config: AgentConfig) -> Status:
    """The agent's state on disk, as one JSON-able object (see the module docstring)."""
    data_dir = config.data_dir
    slots = SlotStore(data_dir)
    records = RecordStore(data_dir)
    status: Status = {
        "device": {"id": config.device.id, "name": config.device.name, "profile": config.device.profile},
        "data_dir": str(data_dir),
        "data_dir_exists": data_dir.is_dir(),
    }
    active: str | None = None
    committed: Status | None = None
    try:
        active = slots.active_slot()
    except (EdgefleetError, OSError, ValueError) as exc:
        committed = {"error": str(exc)}
    slot_views = {name: _slot(slots, name, active) for name in SLOTS}
    if active is not None:
        slot = active
        committed = _guarded(lambda: _committed(slots, slot, slot_views[slot]))
    status["active_slot"] = active
    status["slots"] = slot_views
    status["committed"] = committed

    def update() -> Status:
        record = records.load_record()
        return {"state": record.state, "deployment_id": record.deployment_id, "outcome": record.outcome,
                "reason": record.reason}

    def trusted() -> Status:
        state = records.load_trusted()
        return {"release_counter": state.release_counter, "directive_seq": state.directive_seq,
                "deployment_id": state.deployment_id}

    def root() -> Status:
        if not config.keys.uses_root:
            return {"version": None, "pinned": {"release": len(config.keys.release),
                                                "director": len(config.keys.director)}}
        trust = RootTrust(config)
        return {"version": trust.version, "expires": trust.root.expires,
                "source": "data_dir" if _saved_is(trust) else "config"}

    status["update"] = _guarded(update)
    status["trusted"] = _guarded(trusted)
    status["root"] = _guarded(root)
    status["outbox"] = _guarded(lambda: {"waiting": len(Outbox(data_dir / "outbox", publish=_never))})
    status["serve"] = _guarded(lambda: _serve(config))
    return status


def _saved_is(trust: RootTrust) -> bool:
    """Whether the root in use is the one saved in the data directory (else the configured root_file's)."""
    saved = load_saved_root(trust.path)
    return saved is not None and saved[1] == trust.envelope


def _serve(config: AgentConfig) -> Status:
    """The inference endpoint: where the running agent bound it (serve.json), else what is configured."""
    from shared.inference_client import SERVE_FILE

    serve: Status = {"enabled": config.serve.enabled, "listen": config.serve.listen, "address": None}
    path = config.data_dir / SERVE_FILE
    if config.serve.enabled and path.exists():
        document = read_json(path)
        if not isinstance(document, dict):
            raise ValueError(f"{path} is not a JSON object")
        serve["address"] = f"unix:{document['unix']}" if "unix" in document else document.get("url")
    return serve


def _never(topic: str, payload: bytes) -> None:
    raise AssertionError("agent status never publishes")


# -- for a terminal ---------------------------------------------------------------------------


def _size(size: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{size} B"


def _slot_line(view: Status) -> str:
    state = view["state"]
    if state == "empty":
        text = "empty"
    elif state == "model":
        text = (f"{view['model']} v{view['version']} {view['quantization']}, model "
                f"{view['model_sha256'][:SHA_PREFIX]}, {_size(view['size_bytes'])}")
    else:
        text = state
    if view["active"]:
        text += " (active)"
    if "error" in view:
        text += f" - {view['error']}"
    return f"slot {view['slot']}    {text}"


def status_lines(status: Status) -> list[str]:
    device = status["device"]
    data = status["data_dir"] + ("" if status["data_dir_exists"] else " (does not exist: the agent has not run yet)")
    lines = [f"device    {device['name']} ({device['id']}), profile {device['profile']}", f"data      {data}"]
    lines += [_slot_line(view) for view in status["slots"].values()]

    committed = status["committed"]
    if committed is None:
        lines.append("committed none")
    elif "model" not in committed:
        lines.append(f"committed unreadable: {committed['error']}")
    else:
        by = committed["deployment_id"] or "an unknown deployment"
        problem = f" - {committed['error']}" if "error" in committed else ""
        lines.append(f"committed {committed['model']} v{committed['version']} in slot {committed['slot']}, "
                     f"installed by {by}{problem}")

    update = status["update"]
    if "error" in update:
        lines.append(f"update    unreadable: {update['error']}")
    elif update["deployment_id"] is None:
        lines.append(f"update    {update['state']}, no deployment yet")
    else:
        text = f"update    {update['state']}, deployment {update['deployment_id']}"
        if update["outcome"]:
            text += f", outcome {update['outcome']}"
        if update["reason"]:
            text += f": {update['reason']}"
        lines.append(text)

    trusted = status["trusted"]
    if "error" in trusted:
        lines.append(f"trusted   unreadable: {trusted['error']}")
    else:
        lines.append(f"trusted   release counter {trusted['release_counter']}, directive seq "
                     f"{trusted['directive_seq']}" + (f" ({trusted['deployment_id']})" if trusted["deployment_id"] else ""))

    root = status["root"]
    if "error" in root:
        lines.append(f"root      unreadable: {root['error']}")
    elif root["version"] is None:
        pinned = root["pinned"]
        lines.append(f"root      none: keys pinned in the config ({pinned['release']} release, "
                     f"{pinned['director']} director), no rotation")
    else:
        lines.append(f"root      v{root['version']} (from the {'data dir' if root['source'] == 'data_dir' else 'config'}), "
                     f"expires {time.strftime('%Y-%m-%d', time.gmtime(root['expires']))}")

    outbox = status["outbox"]
    if "error" in outbox:
        lines.append(f"outbox    unreadable: {outbox['error']}")
    else:
        waiting = outbox["waiting"]
        lines.append(f"outbox    {waiting} report{'' if waiting == 1 else 's'} waiting for the server")

    serve = status["serve"]
    if "error" in serve:
        lines.append(f"serve     unreadable: {serve['error']}")
    elif not serve["enabled"]:
        lines.append("serve     off ([serve] enabled = false)")
    elif serve["address"]:
        lines.append(f"serve     {serve['address']} (POST /v1/infer, GET /v1/model, GET /healthz)")
    else:
        lines.append(f"serve     not running (configured to listen on {serve['listen']})")
    return lines

"""Reading a TOML file with one clear error for every way it can fail."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from shared.errors import EdgefleetError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 on Jetson
    import tomli as tomllib


def read_toml(path: Path, what: str, error: type[EdgefleetError]) -> dict[str, Any]:
    """The parsed ``path``; a missing, unreadable or invalid file raises ``error`` naming ``what`` it is."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise error(f"{what} {path} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {what} {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path} is not valid TOML: {exc}") from exc

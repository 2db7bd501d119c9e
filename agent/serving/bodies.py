"""Request and response bodies of ``POST /v1/infer``: JSON, or a ``.npy`` array (``application/x-npy``).

Either way the request is a batch: an array whose first dimension counts
samples, each shaped like the model's input without its batch dimension.
"""

from __future__ import annotations

import io
import json
from typing import Any

from shared.errors import UserInputError
from shared.inference_client import NPY

JSON = "application/json"
# Read as JSON too: no type, and what ``curl -d`` sends unless told otherwise.
_AS_JSON = (JSON, "", "text/plain", "application/x-www-form-urlencoded")


class BadRequest(UserInputError):
    """A request body the endpoint cannot use; ``code`` names the problem in the JSON error."""

    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code


def parse_batch(body: bytes, content_type: str, sample_shape: tuple[int, ...]) -> Any:
    """The batch as float32, shaped ``(n,) + sample_shape``; raises BadRequest saying what was expected."""
    import numpy as np

    media = content_type.split(";")[0].strip().lower()
    if media == NPY:
        try:
            array = np.load(io.BytesIO(body), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise BadRequest(f"the body is not a readable .npy array: {exc}", "bad_npy") from exc
        if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiub":
            raise BadRequest("the .npy body must hold one numeric array", "bad_npy")
    elif media in _AS_JSON:
        try:
            document = json.loads(body)
        except RecursionError as exc:  # as deep as the parser may recurse: no batch of samples nests so
            raise BadRequest("the body nests too deeply to be a batch of samples", "bad_json") from exc
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"the body is not valid JSON: {exc}", "bad_json") from exc
        if not isinstance(document, dict) or set(document) != {"inputs"}:
            raise BadRequest('the body must be a JSON object {"inputs": [...]}', "bad_json")
        try:
            array = np.asarray(document["inputs"], dtype=np.float32)
        except (ValueError, TypeError) as exc:
            raise BadRequest(f"inputs must be a rectangular array of numbers: {exc}", "bad_shape") from exc
    else:
        raise BadRequest(f"unsupported Content-Type {content_type!r}: send {JSON} or {NPY}", "unsupported_media_type")
    expected = "[n, " + ", ".join(str(d) for d in sample_shape) + "]" if sample_shape else "[n]"
    if array.ndim != len(sample_shape) + 1 or tuple(array.shape[1:]) != sample_shape:
        raise BadRequest(f"inputs have shape {list(array.shape)}; this model expects {expected} "
                         "(a batch of samples, each shaped like its input without the batch dimension)", "bad_shape")
    if array.shape[0] == 0:
        raise BadRequest(f"the batch is empty; this model expects {expected} with n >= 1", "bad_shape")
    result = array.astype(np.float32, copy=False)
    if not np.isfinite(result).all():
        raise BadRequest("inputs must be finite numbers", "bad_input")
    return result


def json_bytes(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()

"""``/enrol``: where ``edgefleet agent enrol`` trades its one-time token for its identity (``server/enrolment.py``).

Outside ``/api/v1`` because the token is the credential: no API token is involved. ``/enrol/ca.pem`` is
public (the device checks it against the hash in its token before it trusts it).
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from server.enrolment import Enrolment
from server.web.bodies import capped_body
from shared.codec import decode, encode
from shared.enrolment import CA_PATH, ENROL_PATH, EnrolmentRequest
from shared.errors import NotFoundError, ProtocolError, UserInputError

router = APIRouter(tags=["enrolment"])
MAX_BODY_BYTES = 16 * 1024


def _enrolment(request: Request) -> Enrolment:
    enrolment: Enrolment | None = getattr(request.app.state, "enrolment", None)
    if enrolment is None:
        raise NotFoundError("this server does not enrol devices (it runs without a data directory's broker)")
    return enrolment


@router.get(CA_PATH, summary="The fleet CA certificate (PEM); check it against the hash in the enrolment token")
def ca_certificate(request: Request) -> Response:
    return Response(_enrolment(request).ca_pem(), media_type="application/x-pem-file")


@router.post(ENROL_PATH, summary="Redeem a one-time enrolment token for the device's broker identity, CA and keys")
async def enrol(request: Request) -> JSONResponse:
    enrolment = _enrolment(request)
    body = await capped_body(request, MAX_BODY_BYTES)  # an open route: never buffer more than this
    if body is None:
        raise UserInputError(f"the request is larger than {MAX_BODY_BYTES} bytes")
    try:
        wanted = decode(EnrolmentRequest, json.loads(body))
    except (ValueError, RecursionError, ProtocolError) as exc:
        raise UserInputError(f"not an enrolment request: {exc}") from exc
    client = request.client.host if request.client is not None else "unknown"
    # redeeming writes the database and hashes a password: off the event loop
    response = await run_in_threadpool(enrolment.redeem, wanted, client)
    return JSONResponse(encode(response), headers={"Cache-Control": "no-store"})

"""`Peers`: calls to a sibling service. In this process the sibling's ASGI app is called directly;
its answers mean the same as over HTTP: 200 exists, 404/410 does not, anything else is an outage."""

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fhirkit.errors import UpstreamUnavailable
from servicekit.identity import IDENTITY_HEADER, IN_PROCESS_CALLER
from servicekit.peers import Peers

SECRET = b"peers-test-secret-0123456789abcdef0123456789"
ANSWERS = {"here": 200, "gone": 410, "nowhere": 404, "broken": 503}
SEEN: list[tuple[str, str, str]] = []


async def patient(request: Request) -> Response:
    assert IDENTITY_HEADER.lower() not in request.headers  # nothing to sign in this process:
    caller = request.scope["extensions"][IN_PROCESS_CALLER]  # the identity is handed over in the scope
    SEEN.append((request.path_params["id"], request.url.query, caller.client_id))
    status = ANSWERS[request.path_params["id"]]
    return Response(b'{"resourceType":"Patient","id":"here"}' if status == 200 else b"{}", status_code=status)


async def search(request: Request) -> Response:
    SEEN.append(("?", request.url.query, ""))
    return Response(b'{"resourceType":"Bundle","entry":[{"resource":{"resourceType":"Patient","id":"a b"}}]}')


DIRECTORY = Starlette(routes=[Route("/fhir/Patient/{id}", patient), Route("/fhir/Patient", search)])


def peers() -> Peers:
    return Peers("results-sharing", SECRET, {"directory": None},
                 {"directory": httpx.ASGITransport(app=DIRECTORY)}, cache_seconds=0)


async def test_a_sibling_in_this_process_answers_exists_missing_and_outage() -> None:
    SEEN.clear()
    found = peers()
    assert await found.exists("Patient", "here") is True
    assert await found.exists("Patient", "gone") is False
    assert await found.exists("Patient", "nowhere") is False
    with pytest.raises(UpstreamUnavailable):
        await found.exists("Patient", "broken")
    assert (await found.read("Patient", "here")) == {"resourceType": "Patient", "id": "here"}
    assert [s[0] for s in SEEN] == ["here", "gone", "nowhere", "broken", "here"]
    assert {s[2] for s in SEEN} == {"alliance-internal"}


async def test_a_search_reaches_the_sibling_with_its_query_encoded() -> None:
    SEEN.clear()
    found = await peers().search("Patient", [("identifier", "urn:oid:2.16.156|1101 01"), ("_count", "5")])
    assert found == [{"resourceType": "Patient", "id": "a b"}]
    assert SEEN == [("?", "identifier=urn%3Aoid%3A2.16.156%7C1101+01&_count=5", "")]

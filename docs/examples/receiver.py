"""A rest-hook receiver for the alliance's topic-based subscriptions: standard library only.

    python3 docs/examples/receiver.py --port 8765 --secret "$SECRET" \
        [--fhir http://127.0.0.1:8080/fhir --token "$TOKEN" --subscription ID]

It verifies the `X-Alliance-Signature` header, refuses old or forged notifications (401), and
keeps the last event number it processed in `receiver-state.json`. When a notification skips
numbers (it was down, or the gateway gave up retrying), it fetches the gap from
`Subscription/{id}/$events` before going on, so every event is processed once and in order.
"""

import argparse
import hashlib
import hmac
import json
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

TOLERANCE_SECONDS = 300
STATE = Path("receiver-state.json")


def verify(secret: str, body: bytes, header: str) -> bool:
    """`t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>`."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    if not fields.get("t", "").isdigit() or "v1" not in fields:
        return False
    if abs(time.time() - int(fields["t"])) > TOLERANCE_SECONDS:
        return False
    expected = hmac.new(secret.encode(), fields["t"].encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields["v1"])


def last_number() -> int:
    return json.loads(STATE.read_text())["last"] if STATE.exists() else 0


def remember(number: int) -> None:
    STATE.write_text(json.dumps({"last": number}))


def process(event: dict[str, Any], resources: dict[str, Any]) -> None:
    focus = event.get("focus", {}).get("reference", "(content: empty)")
    resource = resources.get(focus)
    detail = f" status={resource.get('status')}" if resource else ""
    print(f"event {event['eventNumber']}: {focus}{detail}", flush=True)


def handle_bundle(bundle: dict[str, Any], options: argparse.Namespace) -> None:
    status = bundle["entry"][0]["resource"]
    resources = {e["fullUrl"]: e["resource"] for e in bundle["entry"][1:] if "resource" in e}
    if status["type"] in ("handshake", "heartbeat"):
        print(f"{status['type']}: {status['eventsSinceSubscriptionStart']} events so far", flush=True)
        return
    for event in status.get("notificationEvent", []):
        number = int(event["eventNumber"])
        if number <= last_number():
            continue  # already processed (a retry after our answer got lost)
        if number > last_number() + 1:
            catch_up(last_number() + 1, number - 1, options)
        process(event, resources)
        remember(number)


def catch_up(first: int, last: int, options: argparse.Namespace) -> None:
    if not (options.fhir and options.token and options.subscription):
        print(f"missed events {first}..{last}: give --fhir, --token and --subscription to fetch them", flush=True)
        return
    query = urllib.parse.urlencode({"eventsSinceNumber": first, "eventsUntilNumber": last})
    request = urllib.request.Request(
        f"{options.fhir}/Subscription/{options.subscription}/$events?{query}",
        headers={"Authorization": f"Bearer {options.token}", "Accept": "application/fhir+json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        replay = json.load(response)
    status = replay["entry"][0]["resource"]
    resources = {e["fullUrl"]: e["resource"] for e in replay["entry"][1:] if "resource" in e}
    for event in status.get("notificationEvent", []):
        process(event, resources)
        remember(int(event["eventNumber"]))


def handler_for(options: argparse.Namespace) -> type[BaseHTTPRequestHandler]:
    class Notifications(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if options.secret and not verify(options.secret, body, self.headers.get("X-Alliance-Signature", "")):
                self.send_response(401)
                self.end_headers()
                return
            handle_bundle(json.loads(body), options)
            self.send_response(200)  # only after processing: a failure makes the gateway retry
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Notifications


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--secret", required=True, help="the signing secret given in the Subscription")
    parser.add_argument("--fhir", help="the FHIR base URL, to catch up through $events")
    parser.add_argument("--token", help="a bearer token of the subscribing client")
    parser.add_argument("--subscription", help="the Subscription id")
    options = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", options.port), handler_for(options))
    print(f"listening on http://127.0.0.1:{options.port}/", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()

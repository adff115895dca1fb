"""Loading a directory file into the directory service, through its FHIR API.

The whole file goes in one transaction of conditional-free PUTs with the file's ids: loading the
same file twice writes nothing new (an identical update keeps its version), a changed file
updates exactly what changed, and a refused entry is reported with its line in the file.
"""

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson

from directory.directory_file import DirectoryContent

Send = Callable[[bytes], Awaitable[tuple[int, bytes]]]


@dataclass
class LoadReport:
    created: int
    updated: int
    unchanged: int

    def __str__(self) -> str:
        return f"{self.created} created, {self.updated} updated, {self.unchanged} unchanged"


class DirectoryLoadError(RuntimeError):
    pass


def transaction_bundle(content: DirectoryContent) -> bytes:
    entries = [
        {
            "fullUrl": f"{r['resourceType']}/{r['id']}",
            "resource": r,
            "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
        }
        for r in content.resources()
    ]
    return orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries})


async def load_directory(content: DirectoryContent, send: Send) -> LoadReport:
    status, body = await send(transaction_bundle(content))
    resources = content.resources()
    if status != 200:
        raise DirectoryLoadError(_explain(body, resources, content))
    report = LoadReport(0, 0, 0)
    for entry in orjson.loads(body).get("entry", []):
        response = entry.get("response", {})
        if response.get("status", "").startswith("201"):
            report.created += 1
        elif _version(response.get("etag")) == 1 or not entry.get("changed", True):
            report.unchanged += 1
        else:
            report.updated += 1
    return report


def _version(etag: str | None) -> int | None:
    match = re.search(r'"(\d+)"', etag or "")
    return int(match.group(1)) if match else None


def _explain(body: bytes, resources: list[dict], content: DirectoryContent) -> str:
    try:
        outcome = orjson.loads(body)
        message = "; ".join(i.get("diagnostics", "") for i in outcome.get("issue", []))
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace")[:500]
    match = re.search(r"Bundle\.entry\[(\d+)\]", message)
    if match and int(match.group(1)) < len(resources):
        resource = resources[int(match.group(1))]
        key = f"{resource['resourceType']}/{resource['id']}"
        line = content.lines.get(key)
        where = f"{content.source or 'file'}:{line}" if line else content.source or "file"
        return f"{where}: {key} refused: {message}"
    return message

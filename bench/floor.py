"""The floors: a bare ASGI app (no framework) served by uvicorn exactly like the system, doing only
the unavoidable part of a request, so that a figure divided by its floor says how much of the
machine the system's own work leaves.

    BENCH_FLOOR_MODE=read     GET  /fhir/{type}/{id}: the exact stored bytes, from memory
    BENCH_FLOOR_MODE=create   POST /fhir/{type}: fhir.resources R4B validation of the body, 201
    BENCH_FLOOR_MODE=storage  GET: one row's JSON bytes by primary key; POST: insert the body as one
                              row; SQLAlchemy core through servicekit.db.Database, i.e. the same
                              driver, pool and SQLite pragmas as the services

BENCH_FLOOR_DATA names a JSON file {"resources": {id: stored JSON text}, "database_url": …}.
Run by the suite as `python -m bench.floor --port P --workers N`, served as `alliance serve
--workers N` serves the system (`gateway.workers`: a socket per worker, connections balanced).
Until session 19 the floors ran under `uvicorn --workers N`, whose workers share one socket:
wrk's connections then landed mostly on one worker in some figures and not in others, and the
same floor measured 3,000 and 1,900 selects/s from one server, a figure apart.
"""

import argparse
import json
import os
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import Column, LargeBinary, MetaData, String, Table, insert, select

TABLE = Table("floor_resource", MetaData(), Column("id", String(64), primary_key=True),
              Column("body", LargeBinary, nullable=False))
JSON_HEADERS = [(b"content-type", b"application/fhir+json; charset=utf-8")]

Scope = dict[str, Any]


class Floor:
    def __init__(self, mode: str, data_file: str) -> None:
        self.mode = mode
        data = json.loads(Path(data_file).read_text(encoding="utf-8"))
        self.resources = {key: value.encode("utf-8") for key, value in data.get("resources", {}).items()}
        self.database_url: str | None = data.get("database_url")
        self.database: Any = None
        self.models: dict[str, Any] = {}

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
            return
        parts = scope["path"].strip("/").split("/")  # fhir, type[, id]
        if parts == ["healthz"]:
            status, body = 200, b"{}"
        elif scope["method"] == "GET" and len(parts) == 3:
            status, body = await self.read(parts[2])
        elif scope["method"] == "POST" and len(parts) == 2:
            status, body = await self.create(parts[1], await _body(receive))
        else:
            status, body = 404, b"{}"
        await send({"type": "http.response.start", "status": status, "headers": JSON_HEADERS})
        await send({"type": "http.response.body", "body": body})

    async def lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.database is not None:
                    await self.database.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def start(self) -> None:
        if self.mode == "storage":
            from servicekit.db import Database

            self.database = Database(self.database_url or "")
            await self.database.start()

    async def read(self, resource_id: str) -> tuple[int, bytes]:
        if self.mode == "storage":
            async with self.database.transaction(write=False) as conn:
                body = (await conn.execute(select(TABLE.c.body).where(TABLE.c.id == resource_id))).scalar()
        else:
            body = self.resources.get(resource_id)
        return (200, bytes(body)) if body is not None else (404, b"{}")

    async def create(self, resource_type: str, body: bytes) -> tuple[int, bytes]:
        if self.mode == "storage":
            async with self.database.transaction(write=True) as conn:
                await conn.execute(insert(TABLE).values(id=uuid.uuid4().hex, body=body))
        else:
            self.model(resource_type).model_validate_json(body)
        return 201, body

    def model(self, resource_type: str) -> Any:
        if resource_type not in self.models:
            from fhir.resources.R4B import get_fhir_model_class

            self.models[resource_type] = get_fhir_model_class(resource_type)
        return self.models[resource_type]


async def _body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


def prepare_storage(database_url: str, resources: dict[str, str]) -> None:
    """Create the floor's table and store the read sample (run once, before the workers start)."""
    from sqlalchemy import create_engine

    from servicekit.db import sync_url

    engine = create_engine(sync_url(database_url))
    with engine.begin() as conn:
        TABLE.metadata.create_all(conn)
        conn.execute(insert(TABLE), [{"id": k, "body": v.encode("utf-8")} for k, v in resources.items()])
    engine.dispose()


def create_app() -> Floor:
    """uvicorn's factory (`--factory`): one Floor per worker, configured by the environment."""
    return Floor(os.environ["BENCH_FLOOR_MODE"], os.environ["BENCH_FLOOR_DATA"])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    options: dict[str, Any] = {"log_level": "warning", "access_log": False}
    if args.workers > 1:
        from gateway.workers import serve_workers

        serve_workers("bench.floor:create_app", args.host, args.port, args.workers, **options)
    else:
        import uvicorn

        uvicorn.run("bench.floor:create_app", factory=True, host=args.host, port=args.port, **options)


if __name__ == "__main__":
    main()

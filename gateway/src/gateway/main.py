"""ASGI factory for `alliance serve` (uvicorn --factory): what to serve comes from ALLIANCE_SERVE."""

import os

from fastapi import FastAPI

from servicekit.observability import configure_logging
from servicekit.settings import AllianceSettings


def create_app() -> FastAPI:
    settings = AllianceSettings()
    configure_logging(settings.log_level, settings.log_json)
    target = os.environ.get("ALLIANCE_SERVE", "all")
    if target in ("all", "gateway"):
        from gateway.app import create_gateway_app

        return create_gateway_app(settings, distributed=target == "gateway")
    from gateway.app import service_definitions
    from servicekit.app import create_service_app

    return create_service_app(service_definitions()[target], settings)

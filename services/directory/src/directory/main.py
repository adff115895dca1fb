from typing import Any

from fastapi import FastAPI

from directory.fhir import DEFINITION
from servicekit.app import create_service_app
from servicekit.settings import AllianceSettings


def create_app(settings: AllianceSettings | None = None, **options: Any) -> FastAPI:
    return create_service_app(DEFINITION, settings or AllianceSettings(), **options)

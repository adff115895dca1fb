"""One self-validating settings object, read from `ALLIANCE_*` environment variables.

The run mode is configuration only: in the embedded default every service uses a SQLite file
under `data_dir` and the gateway reaches services in-process; in distributed mode each service
gets its own `ALLIANCE_<SERVICE>_DATABASE_URL` and the gateway `ALLIANCE_<SERVICE>_URL`.
"""

import secrets
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SERVICES = ("directory", "referral", "results-sharing", "telemedicine", "platform")


class AllianceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ALLIANCE_", extra="ignore")

    data_dir: Path = Path("data")
    host: str = "127.0.0.1"
    port: int = 8080
    public_base_url: str | None = None  # default http://{host}:{port}/fhir
    environment: str = "development"
    log_level: str = "INFO"
    log_json: bool = True

    # Secrets: generated and kept under data_dir in development; must be set in production.
    internal_secret: str | None = None
    token_signing_key: str | None = None
    access_token_ttl_seconds: int = 300

    directory_database_url: str | None = None
    referral_database_url: str | None = None
    results_sharing_database_url: str | None = None
    telemedicine_database_url: str | None = None
    platform_database_url: str | None = None

    directory_url: str | None = None
    referral_url: str | None = None
    results_sharing_url: str | None = None
    telemedicine_url: str | None = None
    # Where services reach the platform types (Consent) in distributed mode; embedded: in-process.
    platform_url: str | None = None

    # Dates and dateTimes without a time zone, stored or searched, are read in this zone: an IANA
    # name (Asia/Shanghai) or a fixed offset (+08:00, China Standard Time). Every service of a
    # deployment must use the same; set it before loading data (docs/fhir-conformance.md).
    time_zone: str = "+08:00"

    reference_cache_seconds: float = Field(default=30.0, ge=0)
    # How long a recognition check lets the checking organization read the results it returned.
    recognition_grant_hours: float = Field(default=24.0, gt=0, le=24 * 30)
    # How long the parties of a completed referral or consultation keep reading the patient's data.
    relationship_days_after_close: int = Field(default=30, ge=0, le=3650)
    # A query running longer than this is cancelled (0: no limit); the client gets 422 too-costly.
    query_timeout_seconds: float = Field(default=30.0, ge=0)
    # PostgreSQL connections each process keeps per service database; as many again may open in a
    # burst, but those are closed after use, and opening one (a backend, then re-planning every
    # statement) cost more than a read: keep it above the requests a worker serves at once.
    database_pool_size: int = Field(default=20, ge=1, le=200)
    # Requests per second an API client may send on average (0: no limit), and at once.
    rate_limit_per_second: float = Field(default=200.0, ge=0)
    rate_limit_burst: int = Field(default=1000, ge=1)

    # Events (docs/events.md): NATS JetStream when nats_url is set, otherwise the in-process bus.
    nats_url: str | None = None
    nats_stream: str = "ALLIANCE_EVENTS"
    nats_subject_prefix: str = "alliance.events"
    events_poll_interval_seconds: float = Field(default=1.0, gt=0)
    events_retention_days: float = Field(default=8.0, gt=0)
    events_max_attempts: int = Field(default=5, ge=1)
    events_retry_backoff_seconds: float = Field(default=1.0, gt=0)
    events_retry_backoff_max_seconds: float = Field(default=60.0, gt=0)
    jwks_url_allow_list: list[str] = Field(default_factory=list)

    # An external token issuer (a provincial IdP, Keycloak) whose access tokens the gateway accepts
    # besides its own (docs/authentication.md). Unset issuer: only the gateway's own tokens.
    external_issuer: str | None = None  # the exact `iss`
    external_jwks_url: str | None = None  # the issuer's JWK Set; never taken from a token
    external_audience: str | None = None  # the expected `aud`; default the public base URL
    external_organization_claim: str = "org"
    external_scope_claim: str = "scope"
    external_client_claim: str = "client_id"  # falls back to `azp`, then `sub`
    external_level_claim: str = "level"
    external_jwks_cache_seconds: float = Field(default=300.0, gt=0)
    # An unknown `kid` refetches the JWK Set at most this often, so a flood of made-up kids cannot
    # make the gateway hammer the issuer.
    external_jwks_min_refetch_seconds: float = Field(default=30.0, ge=0)

    # Failed client authentications at /auth/token: this many within the window (0: no limit)
    # lock the client id, or the source address, out for `auth_lockout_seconds`.
    auth_failure_window_seconds: int = Field(default=900, gt=0)
    auth_max_failures_per_client: int = Field(default=5, ge=0)
    auth_max_failures_per_address: int = Field(default=50, ge=0)
    auth_lockout_seconds: int = Field(default=900, gt=0)

    # Topic-based subscriptions (docs/notifications.md). Rest-hook endpoints must resolve only to
    # addresses inside these networks; the default lets a developer try a receiver on loopback.
    subscription_endpoint_allow_list: list[str] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    subscription_require_https: bool = False
    subscription_poll_interval_seconds: float = Field(default=1.0, gt=0)
    subscription_retry_backoff_seconds: float = Field(default=5.0, gt=0)
    subscription_retry_backoff_max_seconds: float = Field(default=600.0, gt=0)
    subscription_retry_window_hours: float = Field(default=24.0, gt=0)
    subscription_timeout_seconds: float = Field(default=10.0, gt=0, le=60)
    subscription_heartbeat_min_seconds: int = Field(default=10, ge=1)

    @field_validator("time_zone")
    @classmethod
    def _known_time_zone(cls, value: str) -> str:
        from fhirkit.search.values import time_zone

        time_zone(value)  # a ValueError names what is wrong
        return value

    def database_url(self, service: str) -> str:
        configured = getattr(self, f"{service.replace('-', '_')}_database_url")
        if configured:
            return configured
        return f"sqlite+aiosqlite:///{self.data_dir.resolve() / (service + '.db')}"

    def service_url(self, service: str) -> str | None:
        return getattr(self, f"{service.replace('-', '_')}_url", None)

    @property
    def base_url(self) -> str:
        return (self.public_base_url or f"http://{self.host}:{self.port}/fhir").rstrip("/")

    def secret(self, name: str) -> bytes:
        """`internal_secret` or `token_signing_key`, from the environment or a dev file."""
        value = getattr(self, name)
        if value:
            return value.encode("utf-8")
        if self.environment == "production":
            raise RuntimeError(f"ALLIANCE_{name.upper()} must be set in production")
        path = self.data_dir / f".{name}"
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_urlsafe(48))
            path.chmod(0o600)
        return path.read_text().strip().encode("utf-8")

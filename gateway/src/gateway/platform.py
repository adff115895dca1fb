"""The platform types the gateway itself owns: AuditEvent (the audit repository), Subscription and
SubscriptionTopic (the notification hub) and Consent (read by access decisions). They are served
by the same engine as every service, in-process with the gateway, on the gateway's database,
which also holds the registered API clients."""

from pathlib import Path

from fhirkit.access import AccessPolicy
from gateway import audit_chain, subscriptions
from servicekit import topology
from servicekit.app import ServiceDefinition
from servicekit.migrations import Lineage

LINEAGE = Lineage("gateway", Path(__file__).resolve().parent / "migrations", "gateway_alembic_version")

DEFINITION = ServiceDefinition(
    name="platform",
    title="Alliance platform: audit repository, notification hub, consent",
    resource_types=topology.PLATFORM_TYPES,
    lineages=[LINEAGE],
    # An organization reads its own audit trail and the emergency reads of patients it manages.
    access=AccessPolicy(
        public_types=frozenset({"SubscriptionTopic"}),
        parties={"Consent": ("organization", "actor"), "AuditEvent": ("agent", "entity")},
    ),
    hooks={**subscriptions.HOOKS, "AuditEvent": audit_chain.AuditEventHooks()},
    # The audit trail is never changed (audit_chain): each AuditEvent is stored once, not also
    # copied into the history table, which had doubled the audit's rows and bytes.
    append_only=frozenset({"AuditEvent"}),
    operations=subscriptions.OPERATIONS,
    on_startup=[subscriptions.start_hub],
    background=[subscriptions.run_delivery],
)

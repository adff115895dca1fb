"""Tables this service owns beyond the FHIR store (its own Alembic lineage).

The recognition tables are projections of FHIR resources, written by the resources' hooks in the
same transaction as the resource itself, so they never disagree with what a client reads:

* `recognition_catalog_item`: the catalog in force (the `recognition-item` CodeSystem last loaded);
* `recognition_quality`: quality evaluations (VerificationResult) per center × item or category;
* `recognition_result`: one row per shared result and code (catalog item or LOINC), keyed by
  (patient, system, code, effective time): `$recognition-check` reads a patient's few results of
  one item from it with one index range scan, whoever produced them;
* `recognition_decision`: the decision Tasks, for `$recognition-statistics`;
* `results_patient_merge`: which patient records the directory merged into which (from its Patient
  events, `results_sharing.merges`), so that a merged-away record's results are the survivor's.
Times are microseconds since the Unix epoch (UTC), like the engine's tables.
"""

from sqlalchemy import BigInteger, Boolean, Column, Index, Integer, MetaData, Numeric, String, Table

from fhirkit.store.tables import NAMING_CONVENTION

METADATA = MetaData(naming_convention=NAMING_CONVENTION)

catalog_item = Table(
    "recognition_catalog_item",
    METADATA,
    Column("code", String(64), primary_key=True),
    Column("version", String(64), nullable=False),
    Column("code_system_id", String(64), nullable=False),
    Column("display", String(255), nullable=False),
    Column("category", String(32), nullable=False),
    Column("loinc", String(32), nullable=True, index=True),
    Column("validity_days", Integer, nullable=False),
    Column("validity_days_emergency", Integer, nullable=True),
    Column("validity_days_inpatient", Integer, nullable=True),
    Column("scope_required", String(32), nullable=False),
    Column("price", Numeric(12, 2), nullable=False),
)

quality = Table(
    "recognition_quality",
    METADATA,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("record_id", String(64), nullable=False, index=True),  # VerificationResult id
    Column("organization_id", String(64), nullable=False),
    Column("item_code", String(64), nullable=True),  # one item, or
    Column("category", String(32), nullable=True),  # every item of a category
    Column("scope", String(32), nullable=False),
    Column("valid_from", BigInteger, nullable=False),
    Column("valid_to", BigInteger, nullable=False),
    Index(None, "organization_id", "item_code"),
    Index(None, "organization_id", "category"),
)

result = Table(
    "recognition_result",
    METADATA,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("patient_id", String(64), nullable=False),
    Column("system", String(128), nullable=False),
    Column("code", String(64), nullable=False),
    Column("effective", BigInteger, nullable=False),
    Column("resource_type", String(32), nullable=False),
    Column("resource_id", String(64), nullable=False),
    Column("producer_id", String(64), nullable=False),
    Column("status", String(32), nullable=False),
    Column("critical_open", Boolean, nullable=False),
    Column("diagnostic_conclusion", Boolean, nullable=False),
    Column("mark_label", String(32), nullable=True),
    Index(None, "patient_id", "system", "code", "effective"),
    Index(None, "resource_type", "resource_id"),
)

decision = Table(
    "recognition_decision",
    METADATA,
    Column("task_id", String(64), primary_key=True),
    Column("authored", BigInteger, nullable=False, index=True),
    Column("decision", String(32), nullable=False),  # recognized | not-recognized
    Column("reason", String(8), nullable=True),
    Column("counted", Boolean, nullable=False),  # false for reasons 98 and 99
    Column("item_code", String(64), nullable=True),
    Column("catalog_version", String(64), nullable=True),
    Column("category", String(32), nullable=True),
    Column("producer", String(128), nullable=True),
    Column("requester", String(128), nullable=False, index=True),
    Column("price", Numeric(12, 2), nullable=True),
)

patient_merge = Table(
    "results_patient_merge",
    METADATA,
    Column("merged_id", String(64), primary_key=True),  # the merged-away Patient (link replaced-by)
    Column("survivor_id", String(64), nullable=False, index=True),  # the record that lives on (end of the chain)
    Column("merged_at", BigInteger, nullable=False),  # when the directory wrote the merge (event time)
)

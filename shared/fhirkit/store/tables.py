"""The engine's storage schema, identical on SQLite and PostgreSQL.

`fhir_resource` holds the current version of every resource as the stored JSON bytes;
`fhir_resource_history` every version (except of append-only types, whose one version is the
current row: `StoreConfig.append_only`). Search runs on the `fhir_*_index` tables, filled at write
time for the current version only, so a search is index lookups joined on `rid`, never a JSON scan.
Times are microseconds since the Unix epoch (UTC) so that both databases compare them as integers.
"""

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    UniqueConstraint,
)

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

STORE_METADATA = MetaData(naming_convention=NAMING_CONVENTION)

# SQLite only auto-increments an INTEGER PRIMARY KEY.
RowId = BigInteger().with_variant(Integer(), "sqlite")

resource = Table(
    "fhir_resource",
    STORE_METADATA,
    Column("rid", RowId, primary_key=True, autoincrement=True),
    Column("resource_type", String(64), nullable=False),
    Column("resource_id", String(64), nullable=False),
    Column("version_id", Integer, nullable=False),
    Column("last_updated", BigInteger, nullable=False),
    Column("deleted", Boolean, nullable=False, default=False),
    Column("owner", String(128), nullable=True),
    Column("content", LargeBinary, nullable=True),
    UniqueConstraint("resource_type", "resource_id"),
    Index(None, "resource_type", "last_updated"),
)

resource_history = Table(
    "fhir_resource_history",
    STORE_METADATA,
    Column("hid", RowId, primary_key=True, autoincrement=True),
    Column("rid", BigInteger, nullable=False),
    Column("resource_type", String(64), nullable=False),
    Column("resource_id", String(64), nullable=False),
    Column("version_id", Integer, nullable=False),
    Column("last_updated", BigInteger, nullable=False),
    Column("deleted", Boolean, nullable=False, default=False),
    Column("method", String(8), nullable=False),
    Column("owner", String(128), nullable=True),
    Column("content", LargeBinary, nullable=True),
    UniqueConstraint("resource_type", "resource_id", "version_id"),
    Index(None, "resource_type", "last_updated"),
    Index(None, "last_updated"),
)


def _index_table(name: str, *value_columns: Column, indexes: tuple[tuple[str, ...], ...],
                 by_rid: tuple[str, ...] = ("rid",)) -> Table:
    table = Table(
        name,
        STORE_METADATA,
        Column("rid", BigInteger, nullable=False),
        Column("resource_type", String(64), nullable=False),
        Column("param", String(64), nullable=False),
        *value_columns,
    )
    Index(None, *(table.c[c] for c in by_rid))
    for columns in indexes:
        Index(None, *(table.c[c] for c in columns))
    return table


# Two indexes of a search by patient and code (the commonest) hold every column it reads, so
# PostgreSQL answers them from the index alone once VACUUM (autovacuum) has marked the pages
# all-visible: the patient's rows with their `rid`, and each row's code checked by `rid`. At
# 1,000,000 stored that halved the search's execution and its reads (bench/README.md, session 10).
token_index = _index_table(
    "fhir_token_index",
    Column("system", String(255), nullable=True),
    Column("code", String(255), nullable=True),
    indexes=(("resource_type", "param", "code", "system"),),
    by_rid=("rid", "param", "code", "system", "resource_type"),
)

string_index = _index_table(
    "fhir_string_index",
    Column("norm", String(255), nullable=False),
    Column("exact", String(255), nullable=False),
    indexes=(("resource_type", "param", "norm"),),
)

reference_index = _index_table(
    "fhir_reference_index",
    Column("target_type", String(64), nullable=True),
    Column("target_id", String(128), nullable=True),
    Column("url", String(512), nullable=True),
    indexes=(("resource_type", "param", "target_id", "target_type", "rid"), ("target_type", "target_id")),
)

date_index = _index_table(
    "fhir_date_index",
    Column("low", BigInteger, nullable=False),
    Column("high", BigInteger, nullable=False),
    indexes=(("resource_type", "param", "low"), ("resource_type", "param", "high")),
)

number_index = _index_table(
    "fhir_number_index",
    Column("value", Float, nullable=False),
    indexes=(("resource_type", "param", "value"),),
)

quantity_index = _index_table(
    "fhir_quantity_index",
    Column("value", Float, nullable=False),
    Column("system", String(255), nullable=True),
    Column("code", String(64), nullable=True),
    Column("unit", String(64), nullable=True),
    indexes=(("resource_type", "param", "code", "value"),),
)

uri_index = _index_table(
    "fhir_uri_index",
    Column("value", String(512), nullable=False),
    indexes=(("resource_type", "param", "value"),),
)

INDEX_TABLES = {
    "token": token_index,
    "string": string_index,
    "reference": reference_index,
    "date": date_index,
    "number": number_index,
    "quantity": quantity_index,
    "uri": uri_index,
}

# Grants beyond ownership (fhirkit.access): the grantee organization may read the patient's data
# of `scope` in this service until `expires_at` (microseconds; NULL: until revoked).
access_grant = Table(
    "fhir_access_grant",
    STORE_METADATA,
    Column("gid", RowId, primary_key=True, autoincrement=True),
    Column("grantee", String(128), nullable=False),
    Column("patient_id", String(64), nullable=False),
    Column("scope", String(32), nullable=False),
    Column("source", String(200), nullable=False),
    Column("reason", String(255), nullable=False),
    Column("expires_at", BigInteger, nullable=True),
    Column("created_at", BigInteger, nullable=False),
    # One resource of the patient (a result a recognition check returned); NULL: all of them.
    Column("target_type", String(64), nullable=True),
    Column("target_id", String(64), nullable=True),
    Index(None, "grantee", "patient_id", "scope"),
    Index(None, "source"),
)

# Patients who opted out of sharing (an active deny Consent at the platform): grants do not open
# their data, whatever the relationship (fhirkit.access). One row per Consent.
access_opt_out = Table(
    "fhir_access_opt_out",
    STORE_METADATA,
    Column("consent_id", String(64), primary_key=True),
    Column("patient_id", String(64), nullable=False),
    Column("recorded_at", BigInteger, nullable=False),
    Index(None, "patient_id"),
)

"""patient merges: the database adds a written reference's alias row (a trigger), not a store hook

Every reference-index row the engine writes to a merged-away patient gets its alias row pointing
at the survivor from a trigger in the same statement. The store hook it replaces ran one more
statement per write of anything that refers to a patient.

Revision ID: results_sharing_0005_trigger
Revises: results_sharing_0004_merges
Create Date: 2026-11-23
"""

from collections.abc import Sequence

from alembic import op

revision: str = "results_sharing_0005_trigger"
down_revision: str | None = "results_sharing_0004_merges"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Rows the engine writes carry the reference text in `url`; alias rows have none, so the trigger
# never fires on its own rows. The survivor is already the end of the chain (the table is flat).
_ALIAS_OF_NEW = """
    INSERT INTO fhir_reference_index (rid, resource_type, param, target_type, target_id)
    SELECT NEW.rid, NEW.resource_type, NEW.param, 'Patient', m.survivor_id
    FROM results_patient_merge AS m
    WHERE m.merged_id = NEW.target_id
      AND NOT EXISTS (SELECT 1 FROM fhir_reference_index AS present
                      WHERE present.rid = NEW.rid AND present.param = NEW.param
                        AND present.target_type = 'Patient' AND present.target_id = m.survivor_id)
"""
_WHEN = "NEW.target_type = 'Patient' AND NEW.url IS NOT NULL"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"""
            CREATE FUNCTION results_alias_merged_patient() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                {_ALIAS_OF_NEW};
                RETURN NULL;
            END $$""")
        op.execute(f"""
            CREATE TRIGGER results_alias_merged_patient AFTER INSERT ON fhir_reference_index
            FOR EACH ROW WHEN ({_WHEN}) EXECUTE FUNCTION results_alias_merged_patient()""")
    else:
        op.execute(f"""
            CREATE TRIGGER results_alias_merged_patient AFTER INSERT ON fhir_reference_index
            FOR EACH ROW WHEN {_WHEN} BEGIN {_ALIAS_OF_NEW}; END""")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS results_alias_merged_patient ON fhir_reference_index")
        op.execute("DROP FUNCTION IF EXISTS results_alias_merged_patient()")
    else:
        op.execute("DROP TRIGGER IF EXISTS results_alias_merged_patient")

"""audit schema, order trigger

A second schema, ``audit``, with foreign keys in both directions:

* ``audit.event.user_profile_id -> public."UserProfile"``: emptying ``public``
  with CASCADE would also empty ``audit.event``;
* ``public."order".source_system_id -> audit.source_system``: emptying
  ``audit`` with CASCADE would also empty ``public."order"`` (and from there
  ``"line item-x"``, ``invoice``, ``payment``).

A row-level trigger on ``"order"`` writes to ``audit.event`` on INSERT, UPDATE
and DELETE.  TRUNCATE does not fire row triggers; DELETE does.

Revision ID: 6807df343641
Revises: 2f246a1fc241
Create Date: 2025-02-03 11:05:37.904211

"""

from collections.abc import Sequence

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "6807df343641"
down_revision: str | Sequence[str] | None = "2f246a1fc241"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.execute("CREATE SCHEMA audit")
    op.execute(
        """
        CREATE TABLE audit.source_system (
            id smallint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            name text NOT NULL UNIQUE
        )
        """
    )
    op.execute(
        """
        CREATE TABLE audit.event (
            id bigserial PRIMARY KEY,
            table_name text NOT NULL,
            action text NOT NULL,
            row_id bigint,
            user_profile_id bigint
                REFERENCES public."UserProfile" (id) ON DELETE SET NULL,
            payload jsonb,
            recorded_at timestamptz NOT NULL DEFAULT clock_timestamp()
        )
        """
    )
    op.execute(
        """
        ALTER TABLE public."order"
            ADD COLUMN source_system_id smallint
            REFERENCES audit.source_system (id)
        """
    )
    op.execute(
        """
        CREATE FUNCTION audit.log_order_change() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'DELETE' THEN
                INSERT INTO audit.event (table_name, action, row_id, user_profile_id, payload)
                VALUES (TG_TABLE_NAME, TG_OP, OLD.id, OLD.user_profile_id, to_jsonb(OLD));
                RETURN OLD;
            END IF;
            INSERT INTO audit.event (table_name, action, row_id, user_profile_id, payload)
            VALUES (TG_TABLE_NAME, TG_OP, NEW.id, NEW.user_profile_id, to_jsonb(NEW));
            RETURN NEW;
        END
        $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER order_audit
            AFTER INSERT OR UPDATE OR DELETE ON public."order"
            FOR EACH ROW EXECUTE FUNCTION audit.log_order_change()
        """
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.execute('DROP TRIGGER order_audit ON public."order"')
    op.execute('ALTER TABLE public."order" DROP COLUMN source_system_id')
    op.execute("DROP SCHEMA audit CASCADE")

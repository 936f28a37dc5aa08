"""class cards: a seller card's key may name a class (``class:<code>``)

Revision ID: 0008_class_cards
Revises: 0007_api_tokens
Create Date: 2026-12-04 19:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_class_cards"
down_revision: str | Sequence[str] | None = "0007_api_tokens"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("seller_card") as batch:
        batch.alter_column(
            "card", existing_type=sa.String(length=40), type_=sa.String(length=50)
        )


def downgrade() -> None:
    with op.batch_alter_table("seller_card") as batch:
        batch.alter_column(
            "card", existing_type=sa.String(length=50), type_=sa.String(length=40)
        )

"""Classification settings: classes (laji), types (tyyppi), properties (ominaisuus), categories."""

from __future__ import annotations

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base


class EventClass(Base):
    __tablename__ = "event_class"

    code: Mapped[str] = mapped_column(String(40), primary_key=True)
    name_fi: Mapped[str] = mapped_column(String(200))
    name_en: Mapped[str] = mapped_column(String(200))


class EventType(Base):
    __tablename__ = "event_type"

    code: Mapped[str] = mapped_column(String(40), primary_key=True)
    name_fi: Mapped[str] = mapped_column(String(200))
    name_en: Mapped[str] = mapped_column(String(200))


class EventProperty(Base):
    __tablename__ = "event_property"

    code: Mapped[str] = mapped_column(String(40), primary_key=True)
    name_fi: Mapped[str] = mapped_column(String(200))
    name_en: Mapped[str] = mapped_column(String(200))


class Category(Base):
    """The top-level choice when recording an event; decides its class and type."""

    __tablename__ = "category"

    code: Mapped[str] = mapped_column(String(40), primary_key=True)
    name_fi: Mapped[str] = mapped_column(String(200))
    name_en: Mapped[str] = mapped_column(String(200))
    default_class: Mapped[str] = mapped_column(ForeignKey("event_class.code"))
    default_type: Mapped[str] = mapped_column(ForeignKey("event_type.code"))
    #: Salli valinta: a message may change class and type from the defaults.
    allow_selection: Mapped[bool] = mapped_column(default=False)
    #: Myynnin tavoite: weekly/monthly count targets can be set for sellers.
    sales_target: Mapped[bool] = mapped_column(default=False)
    #: Order of the category's card on the seller view.
    position: Mapped[int] = mapped_column(default=0)

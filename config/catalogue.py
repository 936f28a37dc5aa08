"""The default catalogue installed with the program (DESIGN §3, a contract).

Names are letter for letter those of the design; codes are stable identifiers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NamedCode:
    code: str
    name_fi: str
    name_en: str


@dataclass(frozen=True)
class CategoryDefault:
    code: str
    name_fi: str
    name_en: str
    default_class: str
    default_type: str
    allow_selection: bool
    sales_target: bool


CLASSES: tuple[NamedCode, ...] = (
    NamedCode("events", "Tapahtumat", "Events"),
    NamedCode("sales", "Myynti", "Sales"),
    NamedCode("marketing", "Markkinointi", "Marketing"),
)

TYPES: tuple[NamedCode, ...] = (
    NamedCode("crm_event", "CRM-tapahtumat", "CRM events"),
    NamedCode("lead", "Liidit", "Leads"),
    NamedCode("sales_action", "Myyntitoimenpiteet", "Sales actions"),
    NamedCode("customer_visit", "Asiakaskäynnit", "Customer visits"),
)

PROPERTIES: tuple[NamedCode, ...] = (
    NamedCode("customer_feedback", "Asiakaspalaute", "Customer feedback"),
    NamedCode("commercial", "Kaupallinen", "Commercial"),
    NamedCode("advisory", "Neuvonta", "Advisory"),
)

CATEGORIES: tuple[CategoryDefault, ...] = (
    CategoryDefault("crm_event", "CRM-tapahtuma", "CRM event", "events", "crm_event", True, False),
    CategoryDefault("lead", "Liidi", "Lead", "marketing", "lead", False, False),
    CategoryDefault(
        "sales_action", "Myyntitoimenpide", "Sales action", "sales", "sales_action", False, True
    ),
    CategoryDefault(
        "customer_visit", "Asiakaskäynti", "Customer visit", "sales", "customer_visit", False, True
    ),
)

#: Category a message gets when it names none and no rule applies (DESIGN §7).
SOURCE_DEFAULT_CATEGORY: dict[str, str] = {
    "call": "crm_event",
    "email": "crm_event",
    "visit": "customer_visit",
    "meeting": "crm_event",
}

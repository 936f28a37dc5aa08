"""What each message and field is, in words: the text of docs/schemas/ and of /openapi.json.

Kept beside the schemas (``models.schemas.documented`` joins the two); a field path is its wire
name, a nested field's ``parent.child`` (``parent[].child`` in a list).
"""

from __future__ import annotations

#: Of each kind of message, by schema name.
MESSAGES: dict[str, str] = {
    "crm.call/1": "One status update of one call, sent by a telephony system to the Celery task "
    "crm.ingest.call (queue crm.ingest.call). Every update with the same "
    "source_system and call_id merges into one CRM event. See docs/messages.md.",
    "crm.email/1": "One raw RFC 5322 email with its SMTP envelope, sent by an email gateway to "
    "the Celery task crm.ingest.email (queue crm.ingest.email). The worker parses "
    "the message; the gateway does not. Exactly one of raw_b64 and raw_ref. See "
    "docs/messages.md.",
    "crm.party/1": "An upsert of one customer, contact or staff member, pushed by the ERP to the "
    "Celery task crm.ingest.party (queue crm.ingest.party). The message is the "
    "party's complete record, keyed by its natural key: staff by username, "
    "customer by customer_number, contact by customer_number and email (or name). "
    "See docs/messages.md.",
    "crm.document/1": "Documents (files) added to an event that is already stored, sent to the "
    "Celery task crm.ingest.document (queue crm.ingest.email). The event is named as its "
    "sender knows it: a call or a visit by its source_system and id, an email by its "
    "Message-ID. See docs/messages.md.",
    "crm.task/1": "A work task on an event that is already stored (send the offer, call back), "
    "for a staff member, by a date; sent to the Celery task crm.ingest.task (queue "
    "crm.ingest.party). A later message with the same source_system and task_id changes the "
    "task or marks it done. See docs/messages.md.",
    "crm.target/1": "A weekly or monthly sales target (a count of events) for one seller in one "
    "category, valid from a date until a later target of the same kind replaces "
    "it. Pushed by the ERP to the Celery task crm.ingest.target (queue "
    "crm.ingest.party). Only categories with sales_target (Myynnin tavoite) "
    "accept targets; any other category is rejected with the reason. See "
    "docs/messages.md and docs/targets-and-reports.md.",
    "crm.visit/1": "A customer visit reported by a field or calendar app, sent to the Celery task "
    "crm.ingest.visit (queue crm.ingest.visit). One event per source_system and "
    "visit_id; a later message for the same visit updates it. See "
    "docs/messages.md.",
}

#: Of each field, by schema name and field path.
FIELDS: dict[str, dict[str, str]] = {
    "crm.call/1": {
        "offer_number": "The number of the offer the event concerns (in the ERP).",
        "offer_url": "A link to the offer (http or https).",
        "project_name": "The name of the ERP's project the event belongs to.",
        "project_number": "The number of the ERP's project the event belongs to; "
        "the latest non-empty value of the call's updates is kept.",
        "state": "The CRM status (tila): open (kesken) or done (valmis); default done. "
        "The latest non-empty value of the call's updates is kept; status is the telephony's.",
        "agent": "The staff member who handled the call: username, extension or email address.",
        "call_id": "The provider's id of the call, unique within source_system.",
        "category": "Category code, for example sales_action.",
        "class": "Class code; used only where the category allows selection.",
        "customer_number": "The customer's number in the ERP; takes precedence over "
        "matching by phone number.",
        "duration_s": "Talk time in seconds (at most 7 days).",
        "from": "Calling number or extension, as the provider gives it.",
        "note": "Free text about the call; becomes the event's text.",
        "properties": "Property codes (a set).",
        "recording": "The call recording: exactly one of url and content_b64.",
        "recording.content_b64": "The recording itself, standard base64; stored as a "
        "document of the event.",
        "recording.filename": "File name of an inline recording; default <call_id>-recording.",
        "recording.media_type": "Media type of the recording; default audio/mpeg.",
        "recording.url": "An http or https URL of the recording; the event keeps the "
        "link and the recording is fetched and attached (public "
        "addresses only unless allow-listed).",
        "sequence": "The provider's update counter; orders updates that have the same status rank.",
        "source_system": "The telephony system that sent the update (PBX, cloud "
        "telephony); part of the call's identity.",
        "status": "ringing, answered, completed, missed, busy, failed or voicemail. "
        "Any other provider status is accepted and kept raw.",
        "to": "Called number or extension, as the provider gives it.",
        "type": "Type code; used only where the category allows selection.",
    },
    "crm.email/1": {
        "offer_number": "The number of the offer the event concerns (in the ERP).",
        "offer_url": "A link to the offer (http or https).",
        "project_name": "The name of the ERP's project the event belongs to.",
        "project_number": "The number of the ERP's project the event belongs to; "
        "the first copy's values are kept.",
        "state": "The CRM status (tila): open (kesken) or done (valmis); default done.",
        "mail_from": "The envelope sender (SMTP MAIL FROM).",
        "raw_b64": "The complete raw message (headers, body, attachments) in standard "
        "base64 with padding, without line breaks.",
        "raw_ref": "SHA-256 (64 lowercase hex digits) of a raw message already stored "
        "as a document by our own SMTP gateway.",
        "rcpt_to": "The envelope recipients (SMTP RCPT TO); shows a BCC to the CRM "
        "address and plus-addresses such as crm+visit@.",
        "received_at": "When the gateway received the email, ISO 8601 with a UTC "
        "offset; the event time when the message has no readable Date "
        "header.",
        "source_system": "The gateway or mailbox that delivered the email.",
    },
    "crm.party/1": {
        "active": "false for someone who has left: their events stay theirs, but the "
        "responsible-seller rule no longer assigns them new ones.",
        "customer_number": "The number of the customer the contact works for; an "
        "unknown number creates a placeholder customer.",
        "email": "The contact's primary email address; with customer_number, the "
        "natural key (the name is used when there is no email).",
        "email_domains": "The company's email domains; free-mail domains are ignored for matching.",
        "emails": "Further email addresses of the contact; any of them (and email) "
        "matches the contact.",
        "extension": "The staff member's extension in the PBX.",
        "manager": "Username of the staff member's manager; an unknown username "
        "creates a placeholder staff member.",
        "seller": "Username of the responsible seller; an unknown username creates a "
        "placeholder staff member.",
        "time_zone": "IANA time zone in which the staff member's weeks and months are counted.",
        "username": "The staff member's username (natural key).",
    },
    "crm.document/1": {
        "documents": "The files, stored as documents of the event (an image as a photo, "
        "anything else as an attachment); a file the event already has is not stored twice.",
        "documents[].content_b64": "The file in standard base64 with padding, without line breaks.",
        "documents[].filename": "The file's name; folders and unsafe characters are removed.",
        "documents[].media_type": "Declared media type; the stored type is sniffed from the "
        "content.",
        "event": "The event the documents belong to.",
        "event.id": "The call's call_id, the visit's visit_id or the email's Message-ID "
        "(with or without its angle brackets).",
        "event.kind": "call, email or visit.",
        "event.source_system": "The system that sent the call or the visit (the one in its "
        "messages); not used for an email.",
        "note": "Why the documents were added; kept with each document.",
        "source_system": "The system that sends the documents, for example erp.",
    },
    "crm.task/1": {
        "assignee": "Who is to do it: a staff member's username, email address or extension; "
        "default: the event's seller.",
        "done": "true: the task is done (closing it); false: open (opening it again).",
        "due": "The day it is due; missing: no due date.",
        "event": "The event the task is about.",
        "event.id": "The call's call_id, the visit's visit_id or the email's Message-ID "
        "(with or without its angle brackets).",
        "event.kind": "call, email or visit.",
        "event.source_system": "The system that sent the call or the visit (the one in its "
        "messages); not used for an email.",
        "source_system": "The system that sends the task, for example erp; with task_id, the "
        "task's identity.",
        "task_id": "The sender's own id for the task: a later message with it changes the "
        "same task; missing: every message is a new task.",
        "title": "What is to be done.",
    },
    "crm.target/1": {
        "category": "Category code with sales_target, in the default catalogue "
        "sales_action or customer_visit.",
        "kind": "weekly: per ISO 8601 week (Monday start); monthly: per calendar "
        "month; both in the seller's time zone.",
        "seller": "Username of the seller; an unknown username creates a placeholder "
        "staff member that the staff member's crm.party/1 message fills "
        "in.",
        "source_system": "The system that sent the message, for example erp; kept on "
        "the target as who set it.",
        "valid_from": "The first day the target applies. It applies to every period "
        "whose last day is on or after this date, until a later target "
        "of the same seller, category and kind starts; a target with "
        "the same start date replaces that one.",
        "value": "The target: how many events of the category the seller is expected "
        "to have in each period.",
    },
    "crm.visit/1": {
        "offer_number": "The number of the offer the event concerns (in the ERP).",
        "offer_url": "A link to the offer (http or https).",
        "project_name": "The name of the ERP's project the event belongs to.",
        "project_number": "The number of the ERP's project the event belongs to; "
        "the latest message's values are the visit's.",
        "state": "The CRM status (tila): open (kesken), scheduled (sovittu), done (valmis) or "
        "cancelled (peruttu, the same as cancelled: true); default done.",
        "attachments": "Photos and files, stored as documents of the event.",
        "attachments[].content_b64": "The file in standard base64 with padding, "
        "without line breaks.",
        "attachments[].media_type": "Declared media type; the stored type is sniffed "
        "from the content.",
        "attendees": "Other people present: staff (username or email; kept as "
        "participants) and the customer's contacts (email or name).",
        "cancelled": "true: the visit did not take place; the event stays but no longer counts.",
        "category": "Category code; default customer_visit.",
        "class": "Class code; used only where the category allows selection.",
        "contacts": "The customer's contacts met: email addresses or full names.",
        "customer_number": "The customer's number in the ERP.",
        "ended_at": "ISO 8601 date and time with a UTC offset; not before started_at.",
        "memo": "The visit memo; the event's text, also stored as the document memo.txt.",
        "properties": "Property codes (a set).",
        "seller": "The staff member who made the visit: username, email address, "
        "extension or phone number.",
        "source_system": "The app that reported the visit; part of the visit's identity.",
        "started_at": "ISO 8601 date and time with a UTC offset; a time without an "
        "offset is read in CRM_TIME_ZONE and the assumption noted.",
        "subject": 'The event\'s subject; "Customer visit" when absent.',
        "type": "Type code; used only where the category allows selection.",
        "updated_at": "When the app last changed the visit (ISO 8601 with a UTC "
        "offset). A message older than the version already applied is "
        "recorded but not applied (outcome outdated), so updates that "
        "overtake each other never roll the visit back.",
        "visit_id": "The app's id of the visit, unique within source_system.",
    },
}

#: Of every field of a kind (times, base64, catalogue codes …), where no text of its own is given.
KINDS: dict[str, str] = {
    "base64": "Standard base64 (RFC 4648 section 4) with padding, without line breaks.",
    "code": "A catalogue code. An unknown code is accepted; the event is classified without it "
    "and the refusal is noted.",
    "phones": "Phone numbers in any common notation; they are normalised to E.164 (region "
    "CRM_PHONE_REGION, default FI) and numbers that do not parse are ignored.",
    "source_system": "The system that sent the message, for example erp.",
    "time": "ISO 8601 date and time with a UTC offset, e.g. 2026-11-23T09:14:05+02:00. A time "
    "without an offset is read in the configured zone (CRM_TIME_ZONE) and the assumption "
    "is noted on the event.",
}

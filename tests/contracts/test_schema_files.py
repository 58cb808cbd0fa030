"""The JSON Schemas in ``docs/contracts/`` are exactly what the pydantic models say (SPEC §4).

A change to a contract model without ``comms contracts write`` fails here, so the
published schemas never drift from what the service really accepts and sends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from comms_tasks.contracts.schemas import all_schemas, render

CONTRACTS_DIR = Path(__file__).resolve().parents[2] / "docs" / "contracts"
HOW_TO_FIX = "run `comms contracts write` and commit docs/contracts/"

# SPEC §4 and §6, written down here so that a task or event type dropped in code shows.
INBOUND_TASKS = (
    "comms.handle_therapist_event",
    "comms.handle_matching_event",
    "comms.handle_patient_event",
    "comms.record_email_response",
    "comms.record_call_outcome",
    "comms.queue_email",
    "comms.schedule_call",
)
PUBLISHED_EVENT_TYPES = (
    "email.queued",
    "email.sent",
    "email.failed",
    "email.bounced",
    "email.response_recorded",
    "placement_request.outcome_recorded",
    "call.scheduled",
    "call.unschedulable",
    "call.completed",
    "call.failed",
)
EXPECTED_FILES = {f"inbound/{task}.json" for task in INBOUND_TASKS} | {
    f"events/{event_type}.json" for event_type in PUBLISHED_EVENT_TYPES
}


def test_there_is_a_schema_for_every_task_and_published_event_type() -> None:
    assert set(all_schemas()) == EXPECTED_FILES


def test_the_schema_files_are_up_to_date() -> None:
    schemas = all_schemas()
    on_disk = {
        path.relative_to(CONTRACTS_DIR).as_posix()
        for path in CONTRACTS_DIR.rglob("*")
        if path.is_file()
    }

    missing = sorted(set(schemas) - on_disk)
    extra = sorted(on_disk - set(schemas))
    stale = sorted(
        relative
        for relative in set(schemas) & on_disk
        if (CONTRACTS_DIR / relative).read_text(encoding="utf-8") != render(schemas[relative])
    )

    assert not missing, f"missing in docs/contracts/: {missing}; {HOW_TO_FIX}"
    assert not extra, f"not a contract any more: {extra}; delete them and {HOW_TO_FIX}"
    assert not stale, f"stale in docs/contracts/: {stale}; {HOW_TO_FIX}"


def test_render_is_stable_json_ending_in_a_newline() -> None:
    schema = all_schemas()["inbound/comms.queue_email.json"]

    text = render(schema)

    assert text.endswith("}\n")
    assert text == render(dict(reversed(list(schema.items()))))


def objects_with_properties(node: Any, where: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every (location, sub-schema) that declares properties, anywhere in a schema."""
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        if "properties" in node:
            found.append((where or "/", node))
        for key, child in node.items():
            found += objects_with_properties(child, f"{where}/{key}")
    elif isinstance(node, list):
        for index, child in enumerate(node):
            found += objects_with_properties(child, f"{where}/{index}")
    return found


@pytest.mark.parametrize("relative", sorted(EXPECTED_FILES))
def test_every_schema_has_a_header_and_forbids_unknown_keys(relative: str) -> None:
    schema = all_schemas()[relative]

    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert isinstance(schema["title"], str) and schema["title"]
    assert schema["description"]
    objects = objects_with_properties(schema)
    assert objects
    open_objects = [
        where for where, node in objects if node.get("additionalProperties") is not False
    ]
    assert not open_objects, f"{relative}: objects that allow unknown keys at {open_objects}"


def test_every_schema_is_titled_by_its_task_or_event_type() -> None:
    titles = {relative: schema["title"] for relative, schema in all_schemas().items()}

    assert titles == {
        relative: relative.split("/", 1)[1].removesuffix(".json") for relative in EXPECTED_FILES
    }


def test_the_therapist_upserted_payload_forbids_unknown_keys_and_lists_every_field() -> None:
    schema = all_schemas()["inbound/comms.handle_therapist_event.json"]
    payload = schema["$defs"]["TherapistUpsertedPayload"]

    assert payload["additionalProperties"] is False
    assert set(payload["properties"]) == {
        "therapist_id",
        "salutation",
        "title",
        "first_name",
        "last_name",
        "email",
        "phone",
        "phone_availability",
        "status",
    }
    assert set(payload["required"]) == set(payload["properties"])


def test_inbound_event_schemas_choose_the_model_by_event_type() -> None:
    schema = all_schemas()["inbound/comms.handle_matching_event.json"]

    assert schema["discriminator"]["propertyName"] == "event_type"
    assert set(schema["discriminator"]["mapping"]) == {
        "placement_request.created",
        "placement_request.status_changed",
        "placement_request.cancelled",
    }


def test_published_event_schemas_fix_producer_and_event_type() -> None:
    for event_type in PUBLISHED_EVENT_TYPES:
        properties = all_schemas()[f"events/{event_type}.json"]["properties"]

        assert properties["event_type"]["const"] == event_type
        assert properties["producer"]["const"] == "communication-service"
        assert properties["version"]["const"] == 1

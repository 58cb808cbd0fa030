"""JSON Schemas of every message, kept in ``docs/contracts/`` (a test fails when stale).

Write them with ``comms contracts write``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import Field, TypeAdapter

from comms_tasks.contracts import COMMANDS, INBOUND_EVENTS
from comms_tasks.contracts.published import EVENT_PAYLOADS, published_event_model

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def _with_header(schema: dict[str, Any], title: str, description: str) -> dict[str, Any]:
    # The message's name wins over the model's class name and docstring.
    return {**schema, "$schema": SCHEMA_DIALECT, "title": title, "description": description}


def all_schemas() -> dict[str, dict[str, Any]]:
    """Relative file path -> JSON Schema, for every inbound and published message."""
    schemas: dict[str, dict[str, Any]] = {}
    for task_name, models in INBOUND_EVENTS.items():
        union: Any = Annotated[
            Union[tuple(models.values())],  # noqa: UP007
            Field(discriminator="event_type"),
        ]
        schema = TypeAdapter(union).json_schema()
        schemas[f"inbound/{task_name}.json"] = _with_header(
            schema,
            task_name,
            f"The `event` keyword argument of the task {task_name}.",
        )
    for task_name, model in COMMANDS.items():
        schemas[f"inbound/{task_name}.json"] = _with_header(
            model.model_json_schema(),
            task_name,
            f"The `command` keyword argument of the task {task_name}.",
        )
    for event_type in EVENT_PAYLOADS:
        schemas[f"events/{event_type}.json"] = _with_header(
            published_event_model(event_type).model_json_schema(),
            event_type,
            f"The event {event_type}, published on the exchange comms.events.",
        )
    return schemas


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False, sort_keys=True) + "\n"


def write_schemas(folder: Path) -> list[Path]:
    written = []
    for relative, schema in all_schemas().items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(schema), encoding="utf-8")
        written.append(path)
    return written

"""The checked-in sample messages, with a token filled in where they say ``{token}``."""

from __future__ import annotations

from pathlib import Path

SAMPLES = Path(__file__).parent / "samples"
# A fixed token of new_token()'s shape (26 characters of lowercase base32).
TOKEN = "k7q2m4xz3p5r6t7v2w3y4a5b6c"
# Our Message-ID as comms_tasks.mail.message.new_message_id makes them.
OUR_MESSAGE_ID = "<4f1c2a9e8b7d4c6a9e0f1b2c3d4e5f60@praxis-service.example>"
REPLY_ADDRESS = "antwort@praxis-service.example"
BOUNCE_ADDRESS = "bounce@praxis-service.example"


def sample(name: str, token: str = TOKEN) -> bytes:
    return (SAMPLES / name).read_bytes().replace(b"{token}", token.encode("ascii"))


def all_samples() -> dict[str, bytes]:
    return {path.name: sample(path.name) for path in sorted(SAMPLES.glob("*.eml"))}

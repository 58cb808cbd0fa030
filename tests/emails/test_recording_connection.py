"""The recorder's one connection: synchronous_commit off while it records, reset after."""

from __future__ import annotations

from sqlalchemy import Engine, text

from comms_tasks import db


def test_the_recorders_connection_goes_back_to_the_pool_as_it_came(committed_db: Engine) -> None:
    with db.session_without_flush_wait() as session:
        for _ in range(2):
            with session.begin():
                assert session.scalar(text("SHOW synchronous_commit")) == "off"
    engine = db.get_engine()
    assert engine.pool.checkedin() == 1  # type: ignore[attr-defined]
    with engine.connect() as connection:
        assert connection.scalar(text("SHOW synchronous_commit")) == "on"

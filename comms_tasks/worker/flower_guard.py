"""Flower for this app never runs open, however it is started.

``celery -A comms_tasks flower`` loads this app, and Flower's application imports the
app's modules (``loader.import_default_modules``, which sends ``import_modules``) once
every Flower option is known (command line, ``FLOWER_*`` variables, ``flowerconfig.py``)
and before it binds its port. There we refuse to go on without basic auth (or Flower's
OAuth) and bind to the loopback address unless an address was given. Worker, beat and
``comms`` import their modules in another click command and are left alone.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import click
from celery.signals import import_modules

LOOPBACK = "127.0.0.1"
FLOWER_COMMAND = "flower"


def basic_auth_problem(entries: Sequence[str] | None) -> str | None:
    """Why ``--basic-auth`` / ``FLOWER_BASIC_AUTH`` does not protect Flower, or None."""
    if not entries or not any(entries):
        return "not set"
    for entry in entries:
        user, colon, password = entry.partition(":")
        if not (user and colon and password):
            return "every entry must be user:password"
    return None


def _running_flower() -> bool:
    context = click.get_current_context(silent=True)
    return context is not None and context.command.name == FLOWER_COMMAND


@import_modules.connect
def _refuse_open_flower(**_kwargs: Any) -> None:
    if not _running_flower():
        return
    # Flower's own options, already parsed by its command.
    from tornado.options import options

    problem = basic_auth_problem(options.basic_auth)
    if problem is not None and not (options.auth and options.auth_provider):
        sys.stderr.write(
            f"flower refuses to start without authentication: FLOWER_BASIC_AUTH {problem}; "
            "set FLOWER_BASIC_AUTH=user:password (or --basic-auth=user:password)\n"
        )
        sys.stderr.flush()
        # Past Celery's signal dispatch, which only catches Exception.
        raise SystemExit(2)
    if not options.address and not options.unix_socket:
        options.address = LOOPBACK

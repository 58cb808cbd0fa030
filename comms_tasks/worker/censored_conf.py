"""The worker's ``conf`` inspect command, with every password of every URL masked.

Flower's worker "Config" tab shows ``celery inspect conf``. Celery masks the settings it
knows to be secret (names with PASS, KEY, SECRET, ..., the broker and result URLs), but
not others: ``redbeat_redis_url`` showed RedBeat's password. This command replaces
Celery's (same name, alias and arguments): Celery's filter first, then the password of
any ``scheme://user:password@`` in any value, whatever the setting's name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from celery.utils.serialization import jsonify, strtobool
from celery.worker.control import inspect_command
from kombu.utils.encoding import safe_repr

MASK = "*" * 8
# The password runs to the last "@" before the path, so an unescaped "@" in it is masked too.
URL_PASSWORD = re.compile(r"(?P<prefix>[A-Za-z][A-Za-z0-9+.-]*://[^:@/\s;]*:)[^/\s;]*@")


def mask_credentials(value: Any) -> Any:
    """``value`` with the password of every URL in it (in strings, lists, mappings) masked."""
    if isinstance(value, str):
        return URL_PASSWORD.sub(lambda found: f"{found['prefix']}{MASK}@", value)
    if isinstance(value, Mapping):
        return {key: mask_credentials(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [mask_credentials(item) for item in value]
    return value


@inspect_command(
    alias="dump_conf",
    signature="[include_defaults=False]",
    args=[("with_defaults", strtobool)],
)
def conf(state: Any, with_defaults: bool = False, **_kwargs: Any) -> Any:
    """List configuration, every credential masked."""
    table = state.app.conf.table(with_defaults=with_defaults)
    return mask_credentials(
        jsonify(table, keyfilter=_wanted_config_key, unknown_type_filter=safe_repr)
    )


def _wanted_config_key(key: object) -> bool:
    return isinstance(key, str) and not key.startswith("__")

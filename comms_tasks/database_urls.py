"""Database URLs: the driver made explicit, and a URL safe to show (no password)."""

from __future__ import annotations

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

# The PostgreSQL driver installed with the service. A URL without a driver
# (``postgresql://``, as every PostgreSQL tool prints it) means this one: SQLAlchemy 2.1
# would pick psycopg 3, which is not installed.
POSTGRESQL_DRIVER = "psycopg2"


_SCHEMES_WITHOUT_DRIVER = ("postgresql://", "postgres://")


DATABASE_URL_EXAMPLES = "postgresql://user@host:5432/dbname or sqlite:///path/to/comms.db"


def database_url_for_driver(url: str) -> str:
    """``url`` naming the installed driver; :class:`ValueError` if it cannot work.

    ``postgresql://`` and ``postgres://`` become ``postgresql+psycopg2://``. Only
    PostgreSQL and SQLite are supported, with a driver that can be imported. The
    error's message never repeats the URL (it may hold a password).
    """
    for prefix in _SCHEMES_WITHOUT_DRIVER:
        if url.startswith(prefix):
            url = f"postgresql+{POSTGRESQL_DRIVER}://" + url.removeprefix(prefix)
            break
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise ValueError(f"not a database URL; expected {DATABASE_URL_EXAMPLES}") from None
    backend = parsed.get_backend_name()
    if backend not in ("postgresql", "sqlite"):
        raise ValueError(
            f"unsupported database {backend!r}; expected {DATABASE_URL_EXAMPLES}"
        ) from None
    try:
        parsed.get_dialect().import_dbapi()
    except (NoSuchModuleError, ImportError):
        raise ValueError(
            f"no installed driver {parsed.drivername!r}; expected {DATABASE_URL_EXAMPLES}"
        ) from None
    return url


def safe_database_url(url: str) -> str:
    """``url`` for a message: the password masked (and nothing at all if unparsable)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return "(not a URL)"

"""Which database a stateful service keeps its state in, from one setting.

`--database-url` / FLYNN_DATABASE_URL empty: the embedded SQLite files under --data-dir (the
default). `postgresql://user@host:port/dbname[?sslmode=…]`: that PostgreSQL database, with one
schema per service (flynn_config, flynn_queue, flynn_reactions, flynn_nodes; docs/operations/DATABASE.md).
The password may come from `--database-password-file` / FLYNN_DATABASE_PASSWORD_FILE (a mounted
Secret) instead of the URL; the file wins.

Everything wrong with the setting is a `DatabaseSettingError` whose message names what is wrong
and never repeats the password.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from flynn_runtime.settings import Settings

SCHEMES = ("postgresql", "postgres")
#: Connection parameters an operator may add to the URL's query string (libpq names).
ALLOWED_PARAMS = frozenset(
    {
        "sslmode",
        "sslrootcert",
        "sslcert",
        "sslkey",
        "application_name",
        "connect_timeout",
        "target_session_attrs",
        "options",
    }
)


class DatabaseSettingError(Exception):
    """The database setting is unusable; the message says which part and why (no password in it)."""


@dataclass(frozen=True)
class DatabaseSettings:
    host: str
    port: int
    dbname: str
    user: str
    password: str = ""
    params: tuple[tuple[str, str], ...] = ()

    def conninfo_kwargs(self) -> dict[str, str]:
        """Keyword arguments for psycopg.connect / AsyncConnectionPool(kwargs=…)."""
        out = {"host": self.host, "port": str(self.port), "dbname": self.dbname, "user": self.user}
        if self.password:
            out["password"] = self.password
        out.update(dict(self.params))
        return out

    def display(self) -> str:
        """postgresql://user@host:port/dbname, never with the password (logs, errors)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.dbname}"


def parse_database_url(url: str, password_file: Path | None = None) -> DatabaseSettings:
    """Validate a postgresql:// URL (and read the password file); DatabaseSettingError names the problem."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port or 5432
    except ValueError as e:
        raise DatabaseSettingError(f"--database-url is malformed: {e}") from None
    if parts.scheme not in SCHEMES:
        raise DatabaseSettingError(
            f"--database-url must start with postgresql:// (got scheme {parts.scheme or 'none'!r})"
        )
    host = unquote(parts.hostname or "")
    if not host:
        raise DatabaseSettingError("--database-url has no host (postgresql://user@HOST:port/dbname)")
    dbname = unquote(parts.path.lstrip("/"))
    if not dbname or "/" in dbname:
        raise DatabaseSettingError(
            "--database-url must name one database (postgresql://user@host:port/DBNAME)"
        )
    user = unquote(parts.username or "")
    if not user:
        raise DatabaseSettingError("--database-url has no user (postgresql://USER@host:port/dbname)")
    params: list[tuple[str, str]] = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in ALLOWED_PARAMS:
            raise DatabaseSettingError(
                f"--database-url has an unknown parameter {key!r} (allowed: {', '.join(sorted(ALLOWED_PARAMS))})"
            )
        params.append((key, value))
    password = unquote(parts.password or "")
    if password_file is not None:
        try:
            password = password_file.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise DatabaseSettingError(
                f"cannot read the database password file {password_file} "
                f"(--database-password-file / FLYNN_DATABASE_PASSWORD_FILE): {e.strerror}"
            ) from None
        if not password:
            raise DatabaseSettingError(f"the database password file {password_file} is empty")
    return DatabaseSettings(host, port, dbname, user, password, tuple(params))


def database_from_settings(settings: Settings) -> DatabaseSettings | None:
    """The configured PostgreSQL database, or None for the embedded SQLite default."""
    if not settings.database_url.strip():
        if settings.database_password_file is not None:
            raise DatabaseSettingError(
                "--database-password-file is set but --database-url is not (FLYNN_DATABASE_URL)"
            )
        return None
    return parse_database_url(settings.database_url, settings.database_password_file)

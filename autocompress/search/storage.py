"""Where a study lives, and the heartbeats that let other workers tell a live trial from a lost one.

Storage specs (`--storage`, or `storage=` in `compress`):

    sqlite:///PATH.db                     one process at a time (SQLite locks under parallel writers);
                                          the default of `autocompress run`, in its output folder
    journal:PATH  (or any PATH ending .log)  an Optuna journal file: several processes on one machine
    postgresql://USER:PASSWORD@HOST/DB    many machines (also mysql://..., and +driver forms such as
                                          postgresql+psycopg2:// or mysql+pymysql://)

Every one of them records heartbeats: each running trial's worker writes one every `interval` seconds,
and a trial silent for GRACE_FACTOR intervals is marked failed and queued again (see workers.recover_lost).
The interval is a property of the study (its `heartbeat_s` user attribute, set when the study is made from
$AUTOCOMPRESS_HEARTBEAT_S or HEARTBEAT_S), so every worker judges silence by the same clock.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
import weakref
import warnings
from pathlib import Path
from typing import Callable

import optuna
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend

from ..errors import AutocompressError
from ._optuna import HeartbeatJournalStorage

HEARTBEAT_S = 10     # seconds between a running trial's heartbeats
GRACE_FACTOR = 3     # missed heartbeats before its trial counts as lost
RDB_SCHEMES = ("sqlite", "postgresql", "mysql")
ALLOWED = ("sqlite:///PATH.db, journal:PATH (or a PATH ending in .log), postgresql://USER:PASSWORD@HOST/DB "
           "or mysql://USER:PASSWORD@HOST/DB")


def default_heartbeat() -> int:
    """The heartbeat interval a new study gets: $AUTOCOMPRESS_HEARTBEAT_S, else HEARTBEAT_S."""
    text = os.environ.get("AUTOCOMPRESS_HEARTBEAT_S", str(HEARTBEAT_S))
    if not text.isdigit() or int(text) < 1:
        raise AutocompressError(f"AUTOCOMPRESS_HEARTBEAT_S={text!r} is not allowed; it must be a whole number of "
                                f"seconds >= 1")
    return int(text)


def open_storage(spec, must_exist: bool = False, shown: str | None = None):
    """The Optuna storage a spec names (see the module docstring); None stays None (in memory, this process
    only) and a storage object is used as given. With `must_exist` (reading a study that should be there:
    report, export, worker) a SQLite or journal file that is missing is an error, and no file is created.
    `shown`: the spec an error names (read_study opens a private copy of the file the user named)."""
    if spec is None or isinstance(spec, BaseStorage):
        return spec
    text = str(spec)
    shown = shown or hide_password(text)
    if text.startswith("journal:") or (text.endswith(".log") and "://" not in text):
        return _journal(text.removeprefix("journal:"), must_exist)
    scheme = re.match(r"([a-z]+)(\+\w+)?://", text)
    if scheme is None or scheme.group(1) not in RDB_SCHEMES:
        raise AutocompressError(f"storage {shown!r} is not allowed; use {ALLOWED}")
    if must_exist and scheme.group(1) == "sqlite":
        _require_file(_sqlite_path(text), text)
    if scheme.group(1) != "sqlite" and text[scheme.end():].split("?")[0].count("@") > 1:
        # SQLAlchemy would split at the first '@' and send the rest of the password to DNS as a host name
        raise AutocompressError(f"the password in storage {shown!r} holds '@'; write it as %40")
    url = text
    if scheme.group(0) == "postgresql://":  # SQLAlchemy 2.1 would pick psycopg 3; psycopg2 is our dependency
        url = "postgresql+psycopg2://" + text.removeprefix("postgresql://")
    engine = {"connect_args": {"timeout": 60}} if scheme.group(1) == "sqlite" else {"pool_pre_ping": True}
    try:
        return _rdb(url, engine)
    except ImportError:
        raise AutocompressError(f"storage {shown!r} needs a database driver that is not installed "
                                f"(psycopg2-binary for postgresql://, pymysql for mysql+pymysql://)") from None
    except Exception as exc:
        raise AutocompressError(f"cannot open storage {shown!r}: {first_line(exc)}") from None


def read_study(spec, name: str | None = None) -> optuna.Study:
    """Study `name` in the storage `spec` names (None: the only study it holds), for reading: a missing file,
    a corrupt one, a missing study or several to choose from is one sentence, and nothing is created."""
    shown = hide_password(str(spec))
    copy = _unrolled_copy(spec)
    if copy is not None:  # the copy lives while the storage reads from it
        try:
            storage = open_storage(f"sqlite:///{copy}", must_exist=True, shown=shown)
        except AutocompressError:
            shutil.rmtree(copy.parent, True)
            raise
        weakref.finalize(storage, shutil.rmtree, copy.parent, True)
    else:
        storage = open_storage(spec, must_exist=True)
    try:
        names = optuna.get_all_study_names(storage)
    except Exception as exc:
        raise AutocompressError(f"cannot read storage {shown!r}: {first_line(exc)}") from None
    if name is None and len(names) != 1:
        raise AutocompressError(f"storage {shown!r} holds {len(names)} studies ({', '.join(names) or 'none'}); "
                                f"name one with --study NAME")
    name = names[0] if name is None else name
    if name not in names:
        raise AutocompressError(f"no study {name!r} in storage {shown!r}; it holds: {', '.join(names) or 'none'}")
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except Exception as exc:
        raise AutocompressError(f"cannot open study {name!r} in storage {shown!r}: {first_line(exc)}") from None


SCHEMA_RACE = re.compile(r"already exists|UNIQUE constraint failed|duplicate key", re.IGNORECASE)
SCHEMA_TRIES = 10  # two processes creating one new database (two `run --out NEW` at once): the later one retries


def _rdb(url: str, engine: dict) -> RDBStorage:
    """Optuna's RDB storage. Creating a new database's tables is not atomic: a process that loses the race to
    another creating the same tables waits a moment and opens the tables the other made."""
    for attempt in range(SCHEMA_TRIES):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S,
                                  grace_period=GRACE_FACTOR * HEARTBEAT_S)
        except Exception as exc:
            if attempt == SCHEMA_TRIES - 1 or not SCHEMA_RACE.search(str(exc)):
                raise
            time.sleep(0.1 * (attempt + 1))


def arm(storage, seconds: int, on_lost: Callable) -> None:
    """Beat every `seconds` (the study's interval), count a trial lost after GRACE_FACTOR times that, and call
    `on_lost(study, trial)` for each lost trial this process marks failed."""
    if isinstance(storage, (RDBStorage, HeartbeatJournalStorage)):
        storage.heartbeat_interval = seconds
        storage.grace_period = GRACE_FACTOR * seconds
        storage.heartbeat_stale_trial_callback = on_lost


_USER_PASSWORD = re.compile(r"(://[^:/@\s'\"]*:)[^\s'\"]*@")  # greedy: a password may itself hold '@'
_QUERY_PASSWORD = re.compile(r"([?&](?:password|passwd|pwd)=)[^&\s'\"]*", re.IGNORECASE)


def hide_password(text: str) -> str:
    """`text` (a storage URL, or a message holding one) as it may be printed: every password replaced by ***,
    in user:PASSWORD@host (up to the last '@' of the URL) and in ?password=... query parameters. Every message
    and log line that shows a storage goes through here."""
    return _QUERY_PASSWORD.sub(r"\1***", _USER_PASSWORD.sub(r"\1***@", str(text)))


def _sqlite_path(url: str) -> str | None:
    """The database file of a sqlite:/// URL (None: in memory)."""
    from sqlalchemy.engine import make_url

    try:
        database = make_url(url).database
    except Exception:  # malformed: RDBStorage says why
        return None
    return database if database and database != ":memory:" else None


SQLITE_SIDE_FILES = ("-journal", "-wal", "-shm")


def _unrolled_copy(spec) -> Path | None:
    """A private copy of a SQLite study file that a killed writer left mid-transaction (a `-journal` or `-wal`
    file beside it), or None. SQLite's first reader rolls such a transaction back in place, rewriting the file
    and deleting the journal; reading the copy shows the same committed trials and leaves the folder as it was."""
    path = _sqlite_path(str(spec)) if str(spec).startswith("sqlite:") else None
    if not (path and Path(path).is_file() and Path(path).stat().st_size):  # an empty file: open_storage's error
        return None
    sides = [suffix for suffix in SQLITE_SIDE_FILES if Path(path + suffix).is_file()]
    if not sides:
        return None
    copy = Path(tempfile.mkdtemp(prefix="autocompress-read-")) / Path(path).name
    for suffix in ("", *sides):
        shutil.copyfile(path + suffix, f"{copy}{suffix}")
    return copy


def _require_file(path: str | None, spec: str) -> None:
    """A study file to read must be there and hold something (SQLite would write its tables into an empty one)."""
    if path is not None and not (Path(path).is_file() and Path(path).stat().st_size):
        said = "which is empty" if Path(path).is_file() else "which does not exist"
        raise AutocompressError(f"storage {hide_password(spec)!r} names the file {path!r}, {said}; "
                                f"pass the storage a run or worker wrote its study to")


def _journal(path: str, must_exist: bool = False) -> HeartbeatJournalStorage:
    if not path:
        raise AutocompressError(f"storage 'journal:' names no file; use {ALLOWED}")
    if must_exist:
        _require_file(path, f"journal:{path}")
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return HeartbeatJournalStorage(JournalFileBackend(path), HEARTBEAT_S, GRACE_FACTOR)
    except OSError as exc:
        raise AutocompressError(f"cannot open journal file {path!r}: {exc.strerror or exc}") from None


def first_line(exc: Exception) -> str:
    """The first line of an error message, passwords hidden (it may quote a storage URL)."""
    text = str(exc).strip()
    return hide_password(text.splitlines()[0]) if text else type(exc).__name__

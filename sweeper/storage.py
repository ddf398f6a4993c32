"""Where a study lives: SQLite, an Optuna journal file (shared file systems), a team's database, or memory;
and how its URL is shown (a database password never reaches a log, a results file or a trial's overrides)."""
from __future__ import annotations

import contextlib
from pathlib import Path

from sweeper.errors import SweeperConfigError


def build_storage(url: str | None, heartbeat_s: float | None = None, stale_after_s: float | None = None):
    """`sqlite:///...` or any database URL -> RDBStorage; `journal:///path.log` -> JournalStorage (NFS-safe lock);
    None -> an in-memory study (nothing kept after the sweep). With `heartbeat_s`, an RDBStorage gets Optuna's own
    heartbeats (the driver records them; sweeper.policy.stale_trials reads them back)."""
    from optuna.storages import InMemoryStorage, JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    if url is None:
        return InMemoryStorage()
    beats = {} if heartbeat_s is None else dict(heartbeat_interval=max(1, round(heartbeat_s)),
                                                grace_period=max(1, round(stale_after_s or 120)))

    if url.startswith("journal://"):
        path = Path(url[len("journal://"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        check_journal(path, url)
        return JournalStorage(_whole_records(JournalFileBackend)(str(path), lock_obj=JournalFileOpenLock(str(path))))
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        return _rdb_with_retry(_quiet(lambda: RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}}, **beats)))
    if "://" not in url:
        raise SweeperConfigError("storage", url, "sqlite:///path.db, journal:///path.log or a database URL")
    return _rdb_with_retry(_quiet(lambda: RDBStorage(url, **beats)))


def _whole_records(backend):
    """Optuna's journal file, less the torn record a failed append leaves (a full disk takes part of a write):
    the file is cut back to where the append began, under the journal's lock, so the study stays readable."""
    import os

    from optuna.storages.journal._file import get_lock_file

    class WholeRecords(backend):
        def append_logs(self, logs):
            import json

            data = ("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode("utf-8")
            with get_lock_file(self._lock):
                fd = os.open(self._file_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                start = os.fstat(fd).st_size
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                except OSError:
                    os.ftruncate(fd, start)
                    raise
                finally:
                    os.close(fd)

    return WholeRecords


def _quiet(make):
    """Optuna's ExperimentalWarning for heartbeats ("the interface can change"): optuna>=4.5,<6 is tested."""
    import warnings

    import optuna

    def quiet():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return make()
    return quiet


def _rdb_with_retry(make, attempts: int = 5):
    """Drivers started together on a new database race to create its tables ("table ... already
    exists") and to stamp its schema version (a duplicate row in alembic_version); the loser retries once the
    winner is done. The messages: SQLite, PostgreSQL (its DuplicateTable/DuplicateObject are ProgrammingError),
    MySQL/MariaDB ("Duplicate entry", 1062; a deadlock of two CREATEs, 1213)."""
    import time

    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    races = ("already exists", "unique constraint", "duplicate entry", "duplicate key", "locked", "deadlock")
    for i in range(attempts):
        try:
            return make()
        except (OperationalError, IntegrityError, ProgrammingError) as e:
            if i == attempts - 1 or not any(m in str(e).lower() for m in races):
                raise
            time.sleep(0.5 * (i + 1))


def check_journal(path: Path, url: str) -> None:
    """Refuse a journal that is not whole, record by record: a line that is not a record (a torn write, garbage;
    Optuna skips a bad last line when reading, but the next record appended after it makes every reader fail), or
    a record that names a study or trial no earlier record created (a record lost in the middle: Optuna replays the
    rest onto the wrong trials without a word). Read under the journal's own lock, so a record being appended is
    never half-seen."""
    from optuna.storages.journal import JournalFileOpenLock

    if not path.is_file() or path.stat().st_size == 0:
        return
    lock = JournalFileOpenLock(str(path))
    lock.acquire()
    try:
        bad = _first_bad_record(path)
    finally:
        lock.release()
    if bad is not None:
        number, offset, why, after = bad
        raise SweeperConfigError("storage", url, f"an Optuna journal whose every line is a whole record that follows "
                                 f"the ones before it: line {number} "
                                 f"(byte {offset}) is not ({why}); the {number - 1} records before it are intact"
                                 f"{f' ({after} more lines follow it)' if after else ''}: keep them with "
                                 f"truncate -s {offset} {path} (or move the file aside)")


def _first_bad_record(path: Path) -> tuple[int, int, str, int] | None:
    """(line number, its byte offset, why, how many lines follow it) of the first line that is no whole record or
    that Optuna's own replay would apply to a study or trial that does not exist; None for a whole journal."""
    import json

    replay, offset, bad = _Replay(), 0, None
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if bad is not None:
                bad = (*bad[:3], bad[3] + 1)
                continue
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("no end of line: a torn write")
                record = json.loads(line.decode("utf-8"))
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
                why = replay.check(record)
                if why:
                    raise ValueError(why)
            except ValueError as e:  # JSON and UTF-8 errors too
                bad = (number, offset, " ".join(str(e).split())[:160], 0)
                continue
            offset += len(line)
    return bad


class _Replay:
    """Optuna's own journal replay (records from other workers that name a missing study or trial are skipped
    there, silently), told to say which record named one that no earlier record created."""

    def __init__(self) -> None:
        from optuna.storages.journal._storage import JournalStorageReplayResult as base

        missing: list[str] = []

        class Checked(base):
            def _study_exists(self, study_id, log):
                if not isinstance(study_id, int) or study_id >= self._next_study_id:
                    missing.append(f"names study id {study_id}, which no earlier record created")
                return super()._study_exists(study_id, log)

            def _trial_exists_and_updatable(self, trial_id, log):
                if not isinstance(trial_id, int) or trial_id >= len(self._trials):
                    missing.append(f"names trial id {trial_id}, which no earlier record created: a record before "
                                   "it is missing")
                return super()._trial_exists_and_updatable(trial_id, log)

        self.replay, self.missing = Checked(worker_id_prefix="qlora-exp-journal-check-"), missing

    def check(self, record: dict) -> str | None:
        """Why this record cannot follow the ones before it, or None."""
        try:
            self.replay.apply_logs([record])
        except (KeyError, TypeError, AssertionError, AttributeError) as e:
            return f"not an Optuna journal record: op_code {record.get('op_code')!r} ({type(e).__name__}: {e})"
        except Exception as e:  # noqa: BLE001  (a value Optuna cannot read back)
            return f"a record Optuna cannot replay ({type(e).__name__}: {e})"
        return self.missing.pop() if self.missing else None


def storage_error(url: str, e: BaseException) -> SweeperConfigError:
    """What went wrong opening a storage, as one line: the URL (password hidden) and the driver's reason."""
    while e.__cause__ is not None:  # Optuna's StorageInternalError says less than the database error under it
        e = e.__cause__
    reason = " ".join(str(getattr(e, "orig", None) or e).split())[:300]
    return SweeperConfigError("storage", hide_password(url),
                              f"a storage this process can open and write ({type(e).__name__}: {reason})")


STORAGE_ENV = "QLORA_EXP_STUDY_STORAGE"


def hide_password(url: str | None) -> str | None:
    """The storage URL as logs, result files and trial configs may show it: a database password as ***."""
    if not url or "@" not in url or url.startswith(("sqlite:", "journal:")):
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        import re

        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def storage_from_file(url: str) -> str:
    """A storage URL read back from a sweep's files: a hidden password comes from the environment (STORAGE_ENV)."""
    import os

    if "***@" not in url:
        return url
    full = os.environ.get(STORAGE_ENV)
    if full and hide_password(full) == url:
        return full
    raise SweeperConfigError("storage", url, f"the full URL in the environment variable {STORAGE_ENV} "
                             "(a database password is never written to the sweep's files)")


def storage_for_trials(url: str) -> str | None:
    """What trial processes are told of the study's storage in their overrides (which Hydra and the trial write
    to their folders): the URL itself, or None when it holds a password; then the trials read it from the
    environment they inherit from the driver (STORAGE_ENV; SLURM jobs get it through sbatch's --export=ALL)."""
    import os

    if hide_password(url) == url:
        return url
    os.environ[STORAGE_ENV] = url
    return None


def hide_in_config(config, url: str | None) -> None:
    """Mask a database password typed into the command line everywhere the sweep's config carries it: the
    sweeper's and launcher's storage keys and Hydra's record of the overrides, which multirun.yaml, every trial's
    .hydra/ folder and submitit's job pickles are written from. The driver keeps the URL; the trials read it from
    the environment (storage_for_trials). An `${oc.env:...}` interpolation is left as it is: it holds no secret."""
    from urllib.parse import quote

    from omegaconf import OmegaConf, open_dict, read_write

    if not url or hide_password(url) == url:
        return
    try:
        from sqlalchemy.engine import make_url

        password = make_url(url).password
    except Exception:  # noqa: BLE001
        password = None
    if not password:
        return
    secrets = sorted({password, quote(password, safe=""), quote(password)}, key=len, reverse=True)

    def masked(text: str) -> str:
        for secret in secrets:
            text = text.replace(secret, "***")
        return text

    with read_write(config), open_dict(config):
        for block, key in ((config.hydra.get("sweeper"), "storage"), (config.hydra.get("launcher"), "study_storage")):
            if block is not None and key in block and not OmegaConf.is_interpolation(block, key) and isinstance(
                    block[key], str):
                block[key] = masked(block[key])
        overrides = config.hydra.overrides
        for group in ("hydra", "task"):
            if group in overrides:
                overrides[group] = [masked(str(o)) for o in overrides[group]]


@contextlib.contextmanager
def ask_lock(study):
    """One asker at a time for a study's next trial: drivers and workers check "finished + running < n_trials" and
    then ask, and two doing it at the same moment would both ask (a 7th trial of n_trials=6). A lock beside a file
    storage (SQLite, a journal: POSIX locks, which NFS has too and which die with their process), PostgreSQL's and
    MySQL's own named locks on a database server; nothing for a study in memory (one process)."""
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages._cached_storage import _CachedStorage

    storage = study._storage._backend if isinstance(study._storage, _CachedStorage) else study._storage  # RDB's cache
    path = None
    if isinstance(storage, JournalStorage) and hasattr(storage._backend, "_file_path"):
        path = storage._backend._file_path
    elif isinstance(storage, RDBStorage):
        engine = storage.engine
        if engine.dialect.name == "sqlite":
            path = engine.url.database
        elif engine.dialect.name in SERVER_LOCKS:
            take, give = SERVER_LOCKS[engine.dialect.name]
            import sqlalchemy

            with engine.connect() as conn:
                conn.execute(sqlalchemy.text(take), {"name": f"qlora_exp:{study.study_name}"[:64]})
                try:
                    yield
                finally:
                    conn.execute(sqlalchemy.text(give), {"name": f"qlora_exp:{study.study_name}"[:64]})
                    conn.commit()
            return
    if path is None or path == ":memory:":
        yield
        return
    import fcntl

    with open(f"{path}.ask-lock", "a") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


SERVER_LOCKS = {  # a session-level named lock: released by its call, or when the session ends (a killed asker)
    "postgresql": ("SELECT pg_advisory_lock(hashtext(:name))", "SELECT pg_advisory_unlock(hashtext(:name))"),
    "mysql": ("SELECT GET_LOCK(:name, 86400)", "SELECT RELEASE_LOCK(:name)"),
}
SERVER_LOCKS["mariadb"] = SERVER_LOCKS["mysql"]

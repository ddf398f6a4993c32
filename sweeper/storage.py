"""Where a study lives: SQLite, an Optuna journal file (shared file systems), a team's database, or memory;
and how its URL is shown (a database password never reaches a log, a results file or a trial's overrides)."""
from __future__ import annotations

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
        return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        return _rdb_with_retry(_quiet(lambda: RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}}, **beats)))
    if "://" not in url:
        raise SweeperConfigError("storage", url, "sqlite:///path.db, journal:///path.log or a database URL")
    return _rdb_with_retry(_quiet(lambda: RDBStorage(url, **beats)))


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
    exists"); the loser retries once the winner is done."""
    import time

    from sqlalchemy.exc import IntegrityError, OperationalError

    for i in range(attempts):
        try:
            return make()
        except (OperationalError, IntegrityError) as e:
            if i == attempts - 1 or not any(m in str(e) for m in ("already exists", "UNIQUE constraint", "locked")):
                raise
            time.sleep(0.5 * (i + 1))


def check_journal(path: Path, url: str) -> None:
    """Refuse a journal with a line that is not a whole record (a torn write, garbage): Optuna skips a bad
    last line when reading, but the next record appended after it makes every reader fail, the whole study
    with them. Read under the journal's own lock, so a record being appended is never half-seen."""
    import json

    from optuna.storages.journal import JournalFileOpenLock

    if not path.is_file() or path.stat().st_size == 0:
        return
    lock = JournalFileOpenLock(str(path))
    lock.acquire()
    try:
        with open(path, "rb") as f:
            offset, bad = 0, None
            for number, line in enumerate(f, 1):
                if bad is None:
                    try:
                        if not line.endswith(b"\n"):
                            raise ValueError("no end of line: a torn write")
                        if not isinstance(json.loads(line.decode("utf-8")), dict):
                            raise ValueError("not a JSON object")
                    except ValueError as e:  # JSON and UTF-8 errors too
                        bad = (number, offset, " ".join(str(e).split())[:80], 0)
                        continue
                    offset += len(line)
                else:
                    bad = (*bad[:3], bad[3] + 1)
    finally:
        lock.release()
    if bad is not None:
        number, offset, why, after = bad
        raise SweeperConfigError("storage", url, f"an Optuna journal whose every line is a whole record: line {number} "
                                 f"(byte {offset}) is not ({why}); the {number - 1} records before it are intact"
                                 f"{f' ({after} more lines follow it)' if after else ''}: keep them with "
                                 f"truncate -s {offset} {path} (or move the file aside)")


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

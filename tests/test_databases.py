"""The study on a team's database: PostgreSQL and MariaDB (scripts/db/up.sh starts both on loopback; CI does).

Each test runs on a fresh database of its own (qlora_t_<random>, dropped after), so nothing collides. The URLs come
from QLORA_EXP_TEST_POSTGRES_URL / QLORA_EXP_TEST_MYSQL_URL, else from the file up.sh writes (/tmp/qlora-db/urls.env).
Without them (or without the driver, or with the server down) the tests skip saying why; in CI (CI=true, or
QLORA_EXP_TEST_REQUIRE_DB=1) they fail instead: CI must not pass by skipping them.
"""
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from sweeper.policy import beat, stale_trials
from sweeper.storage import build_storage

REPO = Path(__file__).resolve().parent.parent
TOY = REPO / "tests" / "toy_app" / "app.py"
URLS_FILE = Path(os.environ.get("QLORA_DB_DIR", "/tmp/qlora-db")) / "urls.env"
SERVERS = {"postgres": ("QLORA_EXP_TEST_POSTGRES_URL", "psycopg"), "mysql": ("QLORA_EXP_TEST_MYSQL_URL", "pymysql")}
# the sweep reads its storage from the environment, as the README says to give a password
URL_VAR = "QLORA_TEST_STUDY_DB"
STORAGE = "hydra.sweeper.storage=${oc.env:" + URL_VAR + "}"


class Url(str):
    """A database URL that a failing test's traceback shows with its password hidden."""

    def __repr__(self) -> str:
        return repr(make_url(str(self)).render_as_string(hide_password=True))


def _required() -> bool:
    return (os.environ.get("CI", "").lower() in ("1", "true", "yes")
            or os.environ.get("QLORA_EXP_TEST_REQUIRE_DB", "") not in ("", "0"))


def _unavailable(why: str):
    if _required():
        pytest.fail(f"{why} (CI: the database tests must run; scripts/db/up.sh starts the servers)", pytrace=False)
    pytest.skip(f"{why}: run scripts/db/up.sh (or `make db-up`), or set the URL variable")


def _configured_url(var: str) -> str | None:
    if os.environ.get(var):
        return os.environ[var]
    if URLS_FILE.is_file():
        for line in URLS_FILE.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == var and value.strip():
                return value.strip()
    return None


def _connect_args(url) -> dict:
    return {"connect_timeout": 5}  # psycopg and PyMySQL both


@pytest.fixture(scope="module", params=sorted(SERVERS))
def server(request) -> str:
    """The configured URL of one server (its test role may create databases named qlora*), checked to answer."""
    var, driver = SERVERS[request.param]
    url = _configured_url(var)
    if not url:
        _unavailable(f"no {request.param} URL: {var} is unset and {URLS_FILE} has none")
    try:
        __import__(driver)
    except ImportError:
        _unavailable(f"no {driver} module (pip install -e '.[{request.param}]')")
    engine = sqlalchemy.create_engine(url, connect_args=_connect_args(url), poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as c:
            c.execute(sqlalchemy.text("SELECT 1"))
    except sqlalchemy.exc.SQLAlchemyError as e:
        _unavailable(f"{request.param} at {make_url(url).render_as_string(hide_password=True)} does not answer "
                     f"({type(e.orig or e).__name__}: {' '.join(str(e.orig or e).split())[:200]})")
    finally:
        engine.dispose()
    return Url(url)


@pytest.fixture
def database(server) -> str:
    """A fresh, empty database on the server, dropped after the test: its URL (with the password)."""
    url = _fresh_database(server)
    yield url
    _drop_database(server, make_url(url).database)


def _fresh_database(server: str) -> str:
    name = f"qlora_t_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(server, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool,
                                     connect_args=_connect_args(server))
    try:
        with admin.connect() as c:
            c.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    except sqlalchemy.exc.SQLAlchemyError as e:
        _unavailable(f"the test role cannot create a database {name} ({' '.join(str(e.orig or e).split())[:200]})")
    finally:
        admin.dispose()
    return Url(make_url(server).set(database=name).render_as_string(hide_password=False))


def _drop_database(server: str, name: str) -> None:
    admin = sqlalchemy.create_engine(server, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool,
                                     connect_args=_connect_args(server))
    try:
        with admin.connect() as c:
            if admin.dialect.name == "postgresql":
                c.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            else:
                c.execute(sqlalchemy.text("SET SESSION lock_wait_timeout = 10"))
                c.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name}"))
    except sqlalchemy.exc.SQLAlchemyError as e:  # left behind: harmless (scripts/db/down.sh --purge clears all)
        print(f"could not drop the test database {name}: {e}")
    finally:
        admin.dispose()


def toy_sweep(cwd: Path, url: str, *args: str, n: int = 1, timeout: float = 300,
              literal: bool = False) -> list[subprocess.CompletedProcess]:
    """`n` sweep drivers of the toy app started together on the study in `url` (given through the environment, or
    typed into the command line with `literal`)."""
    storage = f"hydra.sweeper.storage={url}" if literal else STORAGE
    cmd = [sys.executable, str(TOY), "-m", storage, f"hydra.sweeper.study_dir={cwd}/runs", *args]
    env = {**os.environ, URL_VAR: url, "TOY_OUTPUT_ROOT": str(cwd / "out"), "PYTHONPATH": str(REPO)}
    drivers = [subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True) for _ in range(n)]
    try:
        outs = [d.communicate(timeout=timeout) for d in drivers]
    finally:
        for d in drivers:
            try:
                os.killpg(d.pid, signal.SIGKILL)  # the driver if it hangs, and any trial process it left
            except ProcessLookupError:
                pass
    return [subprocess.CompletedProcess(cmd, d.returncode, o, e) for d, (o, e) in zip(drivers, outs, strict=True)]


def load(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=build_storage(url))


def heartbeat_rows(url: str, name: str) -> dict[int, object]:
    """Optuna's RDB heartbeat table for the study: trial number -> its last heartbeat."""
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, connect_args=_connect_args(url))
    try:
        with engine.connect() as c:
            return dict(c.execute(sqlalchemy.text(
                "SELECT t.number, h.heartbeat FROM trial_heartbeats h JOIN trials t ON t.trial_id = h.trial_id "
                "JOIN studies s ON s.study_id = t.study_id WHERE s.study_name = :name"), {"name": name}).all())
    finally:
        engine.dispose()


def toy_value(t, y: float = 0.5) -> float:  # y: the value a grid fixes
    return (t.params["x"] - 3.3) ** 2 + t.params.get("y", y)


# ---- several drivers on one study ----------------------------------------------------------------------------

@pytest.mark.slow
def test_four_drivers_share_one_study_on_a_new_database(tmp_path, database):
    """Four drivers started together on an empty database (they race to create Optuna's tables too)."""
    procs = toy_sweep(tmp_path, database, "x=range(0,10)", "y=choice(0.0,0.5,1.0,1.5,2.0,2.5,3.0,3.5,4.0,4.5)",
                      "hydra.sweeper.study_name=shared", "hydra.sweeper.n_trials=12",
                      "hydra.sweeper.sampler.name=random", n=4)
    assert all(p.returncode == 0 for p in procs), "\n".join(p.stderr[-2000:] for p in procs)
    trials = load(database, "shared").get_trials()
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) == max(numbers) + 1  # unique and gap-free
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == len(trials) == 12  # the total, exactly: nothing lost, failed or asked for twice
    for t in complete:  # every result stored, and it is this trial's own
        assert t.value == pytest.approx(toy_value(t))
    folders = {t.user_attrs["folder"] for t in complete}
    assert len(folders) == len(complete) and all((Path(f) / "metrics.json").is_file() for f in folders)


def test_askers_checking_the_count_at_the_same_moment_never_ask_past_n_trials(database):
    """The server's own named lock (PostgreSQL's advisory lock, MySQL's GET_LOCK) makes the count and the ask one step."""
    from tests.test_concurrency import run_askers

    assert run_askers(database) == [0] * 4
    assert [t.state for t in load(database, "shared").get_trials()] == [TrialState.COMPLETE] * 10


# ---- a grid swept twice: the resume, the heartbeats, the password --------------------------------------------

GRID = ["x=0,1,2", "y=0.5", "sleep_s=1", "hydra.sweeper.study_name=grid", "hydra.sweeper.heartbeat_s=1"]


@pytest.fixture(scope="module")
def grid_twice(server, tmp_path_factory):
    """A grid of three toy trials, then the same sweep again (a resume) with the URL and its password typed into the
    command line: (folder, URL, [first, again])."""
    cwd = tmp_path_factory.mktemp("grid")
    url = _fresh_database(server)
    try:
        yield cwd, url, [toy_sweep(cwd, url, *GRID)[0], toy_sweep(cwd, url, *GRID, literal=True)[0]]
    finally:
        _drop_database(server, make_url(url).database)


@pytest.mark.slow
def test_a_rerun_of_the_same_sweep_resumes_and_reruns_nothing(grid_twice):
    cwd, url, (first, again) = grid_twice
    assert first.returncode == 0 and again.returncode == 0, first.stderr[-2000:] + again.stderr[-2000:]
    trials = load(url, "grid").get_trials()
    assert sorted(t.params["x"] for t in trials) == [0, 1, 2]  # three trials, once each
    assert all(t.state == TrialState.COMPLETE and t.value == pytest.approx(toy_value(t)) for t in trials)
    assert "resumed study 'grid'" in again.stdout + again.stderr and "3 of 3 trials finished" in again.stdout + again.stderr
    assert sorted(p.name for p in (cwd / "runs" / "grid").iterdir() if p.name.isdigit()) == ["0", "1", "2"]


@pytest.mark.slow
def test_the_sweep_beats_in_optunas_rdb_heartbeat_table(grid_twice):
    """hydra.sweeper.heartbeat_s=1: the driver records Optuna's own heartbeats, so every trial (each runs for over
    two seconds) has its row in Optuna's trial_heartbeats table."""
    _, url, _ = grid_twice
    assert sorted(heartbeat_rows(url, "grid")) == [0, 1, 2]


@pytest.mark.slow
def test_the_password_is_in_no_file_and_no_output_of_the_sweep(grid_twice):
    cwd, url, procs = grid_twice
    password = make_url(url).password
    forms = {password, quote(password, safe=""), quote(password)}  # as typed and as a URL holds it
    assert "***@127.0.0.1" in (cwd / "runs" / "grid" / "optimization_results.yaml").read_text()
    # (the asserts name where the password is, never the password itself: a failure's message goes to CI's log)
    for i, p in enumerate(procs):
        leaked = any(form in p.stdout + p.stderr for form in forms)
        assert not leaked, f"the database password is in what sweep {i + 1} of 2 printed"
    scanned = 0
    for f in cwd.rglob("*"):
        if f.is_file():
            data, scanned = f.read_bytes(), scanned + 1
            leaked = any(form.encode() in data for form in forms)
            assert not leaked, f"the database password is in {f}"
    assert scanned > 20  # the sweep's folder, each trial's .hydra and metrics, submitit's pickles and logs


@pytest.mark.slow  # a driver process, refused before any trial
def test_a_wrong_password_is_one_line_with_the_password_hidden(tmp_path, server):
    url = make_url(server).set(password="Wr0ng@pass").render_as_string(hide_password=False)
    (proc,) = toy_sweep(tmp_path, url, "x=0,1", "hydra.sweeper.study_name=refused")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    shown = make_url(server).render_as_string(hide_password=True)
    assert lines[0].startswith(f"error: hydra.sweeper.storage='{shown}' is not accepted: a storage this process can "
                               "open and write (OperationalError: "), lines[0]
    assert any(m in lines[0] for m in ("password authentication failed", "Access denied")), lines[0]
    assert "Wr0ng" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr


# ---- Optuna's heartbeats, in process ---------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_running_trial_whose_rdb_heartbeat_is_old_is_stale(database):
    """build_storage(url, heartbeat_s=1, stale_after_s=2) is an RDBStorage with Optuna's heartbeats: a RUNNING
    trial that has not beaten for over 2 s is reported by stale_trials from Optuna's table alone (the driver's own
    beat attribute is given an hour here), one that has just beaten is not, nor is a finished one."""
    storage = build_storage(database, heartbeat_s=1, stale_after_s=2)
    assert isinstance(storage, optuna.storages.RDBStorage) and storage.get_heartbeat_interval() == 1
    study = optuna.create_study(study_name="beats", storage=storage)
    old, fresh, done = study.ask(), study.ask(), study.ask()
    beat(study, [old._trial_id, fresh._trial_id, done._trial_id])
    study.tell(done, 1.0)
    assert sorted(heartbeat_rows(database, "beats")) == [0, 1, 2]
    deadline = time.time() + 30
    while time.time() < deadline and not stale_trials(study, 3600, mine=set()):
        time.sleep(0.5)
        beat(study, [fresh._trial_id])
    assert [t.number for t in stale_trials(study, 3600, mine=set())] == [old.number]
    assert [t.number for t in stale_trials(study, 3600, mine={old.number})] == []  # a driver's own trials never are
    storage.engine.dispose()

"""A store before its first use: a fresh SQLite file made (migrated) once, under a lock, a
sqlite:/// file whose folder is missing refused, and a study folder's own store checked to be the
folder given (MLflow keeps absolute paths, so a moved copy would write into the original)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

from mlflow import MlflowClient

from study.errors import ConfigError, absolute, one_line

# Our own record of a study, next to Ray's state in DIR/ray/NAME (study.runner.state).
STATE_FILE = "study.json"
# Held (flock) by the one driver that runs or resumes the study, and by an import into it: a
# second `study resume` while it runs would restore the same Tune state and train every
# unfinished trial twice, both logging into the same MLflow runs, and an import meanwhile would
# have its trials log again the steps it wrote. The kernel drops the lock with its process, kill
# -9 included, and Ray's processes do not inherit it (Python opens files non-inheritable).
DRIVER_LOCK = "driver.lock"


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a sqlite:/// URI; None for any other store."""
    prefix = "sqlite:///"
    return Path(tracking_uri[len(prefix) :]) if tracking_uri.startswith(prefix) else None


def store_exists(tracking_uri: str) -> bool:
    """False only for a sqlite:/// file that is not there (yet), or empty (`touch mlflow.db`:
    opening it would write MLflow's schema into it, from a command that only reads): servers
    and other databases are taken to exist, and answer for themselves."""
    database = sqlite_path(tracking_uri)
    if database is None or str(database) == ":memory:":
        return True
    return database.is_file() and database.stat().st_size > 0


def artifact_dir(output_dir: Path) -> Path:
    """A study folder's artifact root, beside its mlflow.db (and `study ui`'s)."""
    return absolute(output_dir) / "mlartifacts"


# Stores that keep artifacts under a root of their own (`mlflow server --artifacts-destination`
# or --default-artifact-root, Databricks, MLflow's retired file store in its own folder): a new
# experiment takes theirs.
OWN_ROOT_SCHEMES = ("http", "https", "databricks", "file")


def artifact_location(tracking_uri: str, experiment: str, folder: Path) -> str | None:
    """Where a new experiment of this store keeps its artifacts: beside a SQLite file
    (DIR/mlartifacts/EXPERIMENT, so a study folder holds its whole study, and an explicit
    --tracking-uri sqlite:///... keeps its files with its database); in `folder` (the command's
    --output) for another database (postgresql://...), which has no folder of its own; None
    for a store with a root of its own (a server). (MLflow's default for a database is
    ./mlruns of the working folder: files scattered wherever a command happened to run.)"""
    database = sqlite_path(tracking_uri)
    if database is not None:
        return (artifact_dir(absolute(database).parent) / experiment).as_uri()
    if tracking_uri.split(":")[0] in OWN_ROOT_SCHEMES:
        return None
    return (artifact_dir(folder) / experiment).as_uri()


def store_uri(output_dir: Path) -> str:
    """The embedded store: a SQLite file in the output folder."""
    return f"sqlite:///{absolute(output_dir)}/mlflow.db"


def check_folder(tracking_uri: str, flag: str = "--tracking-uri") -> None:
    """A sqlite:/// file can be made only in a folder that exists: MLflow would otherwise make
    every missing folder of the path (at the filesystem's root, as root)."""
    database = sqlite_path(tracking_uri)
    if database is None or str(database) == ":memory:" or database.exists():
        return
    if not database.parent.is_dir():
        raise ConfigError(
            f"{flag} {tracking_uri}: no folder {database.parent} for the database file; "
            "make it first, or name a file in an existing folder"
        )


def client(tracking_uri: str) -> MlflowClient:
    """An MlflowClient of the store, its tables made: MLflow creates and migrates a fresh SQLite
    file on first use, and two processes doing so at once (two studies into one new --output)
    break each other's migration (`table ... already exists`). One at a time, under a lock on a
    file next to the database; once made, the first query finds every table and migrates
    nothing."""
    database = sqlite_path(tracking_uri)
    if database is None or str(database) == ":memory:":
        return MlflowClient(tracking_uri=tracking_uri)
    check_folder(tracking_uri, "tracking URI")
    with _locked(database.with_name(database.name + ".lock")):
        # The client opens its model-registry store (the same file) at once, the runs' store
        # on the first query: both inside the lock.
        mlflow = MlflowClient(tracking_uri=tracking_uri)
        mlflow.search_experiments(max_results=1)
    return mlflow


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    try:
        handle = path.open("a")
    except OSError:
        # A folder we may not write to (a read-only copy of a study): nothing can migrate there.
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_own_store(output: Path, name: str, command: str) -> None:
    """Refuse a study folder whose own store (DIR/mlflow.db) its study.json places in another
    folder: moved or copied, its runs' artifact paths still name the original, where `command`
    would read and write. A study of a --tracking-uri store, or without a record, passes."""
    output = absolute(output)
    path = output / "ray" / name / STATE_FILE
    try:
        record = json.loads(path.read_text())
        recorded = record["tracking_uri"] if record.get("own_store") else None
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ConfigError(f"{path}: not a readable study record ({one_line(error)})") from None
    if recorded is None or recorded == store_uri(output):
        return
    database = sqlite_path(recorded)
    home = database.parent if database else recorded
    raise ConfigError(
        f"study {name}: its MLflow store {database} belongs to {home}, not {output} (MLflow "
        f"keeps absolute paths); {command} it with --output {home}, moving the folder back "
        "first if it was moved"
    )


def refuse_folder(database: Path | None, flag: str) -> None:
    """A sqlite:/// path that is a folder: SQLite cannot open it, and MLflow retries for two
    minutes before a traceback. One line at once instead."""
    if database is None or not database.is_dir():
        return
    hint = (
        f"use sqlite:///{absolute(database) / 'mlflow.db'} for a store in it"
        if flag == "--tracking-uri"
        else "the store is a file of that name: move the folder away"
    )
    folder = absolute(database)
    raise ConfigError(f"{flag}: {folder} is a folder, not a SQLite database file; {hint}")


@contextlib.contextmanager
def driving(experiment_dir: Path, name: str) -> Iterator[None]:
    """Hold the study's driver lock for the block; ConfigError naming the driver that holds it."""
    experiment_dir.mkdir(parents=True, exist_ok=True)
    path = experiment_dir / DRIVER_LOCK
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise ConfigError(
                f"study {name} is running now (driver pid {holder}, lock {path}): stop it first "
                "(Ctrl-C, or kill PID), or wait for it to end"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield

"""File-system primitives every stage relies on: atomic writes, fsync, locks, folder checks.

The rules they implement, which the run store, the exporters and training all depend on:

- A file under its final name is always complete: it is written under a temporary name in the
  same folder (``.tmp-<name>.<pid>.<random>``, the one prefix clean-ups look for) and renamed.
- A directory is replaced by an atomic exchange (``renameat2(RENAME_EXCHANGE)`` on Linux), so at
  every moment the final name holds either the complete old tree or the complete new one.
- Errors of the operating system become one-line :class:`~factory.errors.RunError` naming the path
  (disk full, permission denied), never a traceback.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import io
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from factory.errors import InputError, RunError

#: The prefix of every temporary file and folder factory writes; clean-ups delete only these.
TMP_PREFIX = ".tmp-"


def temp_name(path: Path) -> Path:
    """A temporary sibling of ``path``, unique to this process and call."""
    return path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")


def write_error(exc: OSError, path: Path) -> RunError:
    """The one-line error for a failed write of ``path``."""
    if exc.errno == errno.ENOSPC or exc.errno == errno.EDQUOT:
        return RunError(f"disk full while writing {path}; free space and re-run the same command to resume")
    if exc.errno == errno.EROFS:
        return RunError(f"cannot write {path}: read-only file system")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return RunError(f"cannot write {path}: permission denied")
    if exc.errno == errno.ENAMETOOLONG:
        return RunError(f"cannot write {path}: file name too long")
    return RunError(f"cannot write {path}: {exc.strerror or exc}")


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (errors ignored: some file systems refuse directories)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------ atomic files


class AtomicFile:
    """A file written under a temporary name and renamed to ``path`` by :meth:`commit`.

    Use as a context manager (commit on success, remove the temporary file on any exception), or
    call :meth:`commit` / :meth:`abort` yourself for a file kept open across a longer job.
    """

    def __init__(self, path: Path, mode: str = "wb", fsync: bool = True, encoding: str | None = None) -> None:
        self.path = Path(path)
        self.tmp = temp_name(self.path)
        self.fsync = fsync
        try:
            self.fh: IO[Any] = open(self.tmp, mode, encoding=encoding if "b" not in mode else None)  # noqa: SIM115
        except OSError as exc:
            raise write_error(exc, self.path) from exc

    def write(self, data: Any) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.abort()
            raise write_error(exc, self.path) from exc

    def commit(self) -> None:
        """Flush (and fsync), then give the file its final name."""
        try:
            self.fh.flush()
            if self.fsync:
                os.fsync(self.fh.fileno())
            self.fh.close()
            os.replace(self.tmp, self.path)
        except OSError as exc:
            self.abort()
            raise write_error(exc, self.path) from exc

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.fh.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def atomic_write_bytes(path: Path, data: bytes | memoryview, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename."""
    with AtomicFile(Path(path), "wb", fsync=fsync) as fh:
        fh.write(data)


def atomic_write_text(path: Path, text: str, fsync: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


#: Options of every Parquet file factory writes. Page checksums (a CRC of each data page) make a
#: bit flip in the data a read error: without them about one flip in nine still decodes, into
#: other keys, scores or sizes (zstd frames carry no checksum of their own).
PARQUET_OPTIONS: dict[str, Any] = {"compression": "zstd", "compression_level": 3, "write_statistics": True, "write_page_checksum": True}


def open_parquet(path: Path) -> pq.ParquetFile:
    """A Parquet file for reading, its pages' checksums verified (files written without them,
    by older versions, read as before)."""
    return pq.ParquetFile(path, page_checksum_verification=True)


def parquet_bytes(table: pa.Table, metadata: dict[str, str] | None = None, **options: Any) -> bytes:
    """Serialize a table with fixed options: the same table always gives the same bytes.
    ``options`` go to ``pyarrow.parquet.write_table`` (e.g. which columns get dictionaries)."""
    if metadata:
        table = table.replace_schema_metadata(_with_metadata(table.schema, metadata).metadata)
    buf = io.BytesIO()
    settings: dict[str, Any] = {**PARQUET_OPTIONS, **options}
    pq.write_table(table, buf, **settings)
    return buf.getvalue()


def atomic_write_parquet(table: pa.Table, path: Path, metadata: dict[str, str] | None = None, **options: Any) -> None:
    atomic_write_bytes(path, parquet_bytes(table, metadata, **options))


def _with_metadata(schema: pa.Schema, metadata: dict[str, str]) -> pa.Schema:
    meta = dict(schema.metadata or {})
    meta.update({k.encode(): v.encode() for k, v in metadata.items()})
    return schema.with_metadata(meta)


@contextlib.contextmanager
def atomic_parquet_writer(path: Path, schema: pa.Schema, metadata: dict[str, str] | None = None) -> Iterator[pq.ParquetWriter]:
    """A Parquet writer on a temporary file that becomes ``path`` (fsynced) when the block ends.

    For tables written in parts (a plan or an index of millions of rows): nothing is held whole in
    memory, and ``path`` is the old file or the complete new one, never a partial file.
    """
    if metadata:
        schema = _with_metadata(schema, metadata)
    tmp = temp_name(path)
    try:
        with pq.ParquetWriter(tmp, schema, **PARQUET_OPTIONS) as writer:
            yield writer
        fsync_path(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise write_error(exc, path) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


# ------------------------------------------------------------------------------ JSON descriptors


#: JSON's names for the types a descriptor must not be (it must be an object).
_JSON_TYPE_NAMES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean", type(None): "null"}


def read_json_object(path: Path, what: str, required: tuple[str, ...] = (), hint: str = "") -> dict[str, Any]:
    """The JSON object in the descriptor ``path`` (``toy.json``, ``run.json``, ``train.json``...).

    The one reader of such files: an unreadable file, text that is not JSON, valid JSON of another
    shape (an array, a string, a number) or an object without one of the ``required`` keys is a
    one-line :class:`~factory.errors.InputError` naming the file (``what`` says what it should
    be: "run file"; ``hint`` what to do about it), never a crash later where a key is read.
    """
    advice = f"; {hint}" if hint else ""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"{path}: unreadable {what} ({exc.strerror or exc}){advice}") from exc
    except ValueError as exc:  # not UTF-8, not JSON
        raise InputError(f"{path}: damaged {what}, not valid JSON ({exc}){advice}") from exc
    if not isinstance(value, dict):
        found = _JSON_TYPE_NAMES.get(type(value), type(value).__name__)
        raise InputError(f"{path}: damaged {what}: {found} where a JSON object is expected{advice}")
    missing = [key for key in required if key not in value]
    if missing:
        raise InputError(f"{path}: damaged {what}: no {', '.join(repr(k) for k in missing)}{advice}")
    return value


# ------------------------------------------------------------------------------ directories


def temp_dir_for(final: Path) -> Path:
    """A new empty temporary folder beside ``final``, to be moved in with :func:`replace_dir`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}.", dir=final.parent))


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete folder ``tmp`` to ``final``, replacing any folder there.

    The two are exchanged atomically where the system allows (so ``final`` always holds a whole
    tree); elsewhere the old folder is renamed aside first (a reader then finds no ``final`` for the
    instant between the two renames). The old tree is deleted afterwards either way.
    """
    if not final.exists():
        os.rename(tmp, final)
        fsync_path(final.parent)
        return
    if _exchange(tmp, final):
        fsync_path(final.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    aside = final.with_name(f"{TMP_PREFIX}{final.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(final, aside)
    os.rename(tmp, final)
    fsync_path(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def link_tree(src: Path, dst: Path) -> None:
    """Fill the new folder ``dst`` with hard links to the files under ``src`` (copies where the
    file system refuses links). Used for identical, read-only model files shared by checkpoints:
    one copy on disk, and deleting either folder leaves the other whole."""
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def check_writable_dir(path: Path, what: str = "output folder") -> None:
    """Create ``path`` if needed and prove it writable with a probe file; one-line error if not."""
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: exists and is not a folder ({what} expected)")
    refuse_dangling_link(path, f"another {what}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = temp_name(path / "probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"{path}: {what} is not writable ({exc.strerror or exc})") from exc


def refuse_dangling_link(path: Path, instead: str) -> None:
    """A one-line error when ``path`` or a parent is a symlink to nothing, where ``mkdir`` would
    fail with a bare 'File exists'; ``instead`` ends the advice ("another --out")."""
    dangling = _dangling_link(path)
    if dangling is not None:
        raise InputError(
            f"{dangling}: is a symlink to {os.readlink(dangling)}, which does not exist; create that folder or "
            f"choose {instead}"
        )


def _dangling_link(path: Path) -> Path | None:
    """``path`` or the first of its parents that is a symlink to nothing (``mkdir`` fails there
    with a bare 'File exists'), or None."""
    for p in reversed((path, *path.parents)):
        if p.is_symlink() and not p.exists():
            return p
    return None


def check_utf8_path(path: Path, option: str) -> None:
    """Refuse a path that is not valid UTF-8 (its bytes came from another encoding): the index and
    run.json record it as text, and Parquet's writer fails on it after the run has started."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError as exc:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise InputError(f"{option} {shown}: the path is not valid UTF-8; choose a name in UTF-8") from exc


def check_output_file(path: Path) -> Path:
    """Check, before any work, that a file can be written at ``path`` (its folder is created), and
    return where to write it: ``path``, or the target of ``path`` when it is a symbolic link (the
    user's link is kept and its target gets the new file, as an editor saving through a link does)."""
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if path.is_dir():
        raise InputError(f"{path}: is a directory; give a file name")
    check_writable_dir(path.parent if str(path.parent) else Path("."), "the output file's folder")
    probe = temp_name(path)  # the very name the write will use (a long name fails here, not after the work)
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"{path}: cannot write this file ({exc.strerror or exc})") from exc
    return path


# ------------------------------------------------------------------------------ locks


def is_locked(path: Path) -> bool:
    """Whether a process holds the :class:`FileLock` on ``path`` now (False if there is no file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing drops the shared lock, if it was taken


class FileLock:
    """An exclusive advisory lock (``flock``) on a file, held until released or the process dies.

    Taking it opens the lock file for writing, so a folder this user cannot write (permissions, a
    read-only mount) fails here, before any work: a one-line :class:`~factory.errors.InputError`
    (``unwritable_message``, else "<folder>: cannot be written", with the system's reason).
    """

    def __init__(self, path: Path, busy_message: str, unwritable_message: str | None = None) -> None:
        self.path = Path(path)
        unwritable = unwritable_message or f"{self.path.parent}: cannot be written"
        try:
            self._fh: io.BufferedRandom | None = open(self.path, "a+b")  # noqa: SIM115 - held until release
        except OSError as exc:
            raise InputError(f"{unwritable} (cannot open its lock file {self.path.name}: {exc.strerror or exc})") from exc
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self.release()
            raise InputError(busy_message) from exc
        except OSError as exc:  # a file system without locks (ENOLCK)
            self.release()
            raise InputError(f"{unwritable} (cannot lock {self.path.name}: {exc.strerror or exc})") from exc

    def release(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class FolderLock:
    """An exclusive advisory lock (``flock``) on a folder itself, for a command that writes into a
    folder it does not own (``factory matte``'s output): no lock file is left among the user's."""

    def __init__(self, folder: Path, busy_message: str) -> None:
        self._fd: int | None = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self.release()
            raise InputError(busy_message) from exc
        except OSError:  # a file system without locks: run unlocked, as before locks existed
            pass

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# ------------------------------------------------------------------------------ owned output folders

#: The lock file of an output folder a command owns (export, composite).
OWNED_LOCK = ".lock"


def _is_debris(path: Path) -> bool:
    """The lock or a temporary file a killed command leaves (regular files only, never a link)."""
    return (path.name == OWNED_LOCK or path.name.startswith(TMP_PREFIX)) and path.is_file() and not path.is_symlink()


def open_owned_folder(root: Path, state_file: str, kind: str, what: str) -> tuple[FileLock, dict[str, Any] | None]:
    """Create or check an output folder a command owns, take its lock, return its previous state.

    The folder is the command's when it holds ``state_file`` whose ``"kind"`` is ``kind`` (an
    unreadable one counts as the command's, with no plan, so it is redone), or when it holds
    nothing but the lock and temporary files: what a run killed before its first state write
    leaves. Anything else is somebody's folder and is refused with a one-line
    :class:`~factory.errors.InputError` (``what`` names the command: "factory export").
    """
    if root.exists() and not root.is_dir():
        raise InputError(f"{root}: exists and is not a directory; choose another --out")
    refuse_dangling_link(root, "another --out")
    previous: dict[str, Any] | None = None
    if (root / state_file).is_file():
        try:
            loaded = json.loads((root / state_file).read_text())
            previous = loaded if isinstance(loaded, dict) else {"kind": None}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            previous = {"kind": kind, "plan": None}
        if previous.get("kind") != kind:
            raise InputError(f"{root}: {state_file} is not a {what}'s; choose another --out")
    elif root.is_dir() and not all(_is_debris(p) for p in root.iterdir()):
        raise InputError(f"{root}: exists, is not empty and is not a {what}; choose another --out")
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(root / OWNED_LOCK, f"{root}: another {what} is writing here")
    except OSError as exc:
        raise InputError(f"{root}: cannot create the output folder ({exc.strerror or exc})") from exc
    return lock, previous


def remove_temporaries(root: Path) -> int:
    """Delete the temporary files under ``root`` (call it holding the folder's lock, so none is
    live); symlinks and folders are left alone. Returns how many were removed."""
    removed = 0
    for path in root.rglob(f"{TMP_PREFIX}*"):  # rglob does not enter symlinked folders
        if path.is_symlink() or not path.is_file():
            continue
        with contextlib.suppress(OSError):
            path.unlink()
            removed += 1
    return removed


def portable_path(spec: str, root: Path) -> str:
    """How a dataset written in ``root`` names a source given as ``spec`` without a path of this
    machine: relative to ``root`` when it lies inside it, else its last component only (a folder's
    name, a shard pattern's file part). Callers pass paths only: a word such as ``procedural``
    would be taken for a file in the current folder."""
    here = Path(os.path.realpath(spec))  # realpath, not resolve: a missing name or a link loop is no error
    top = Path(os.path.realpath(root))
    if here == top or top in here.parents:
        return here.relative_to(top).as_posix()
    return Path(spec).name or spec

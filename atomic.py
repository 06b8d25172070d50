"""Atomic writes: a file or a whole folder the project writes appears complete or not at all.

Both write beside the target (same file system) and rename at the end, so a reader, or a run resumed after a kill,
never sees a half-written result. Replacing an existing folder takes two renames (old -> PATH.old, new -> PATH); a
kill between them leaves PATH.old, which `finished_folder` still finds.
"""
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def atomic_write(path, write) -> None:
    """write(binary file object) into a temporary file beside `path`, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the user's umask decides, as for open()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def save_tensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """safetensors' save_file, with the file's permissions following the user's umask (save_file makes 0600, which
    collaborators on a shared cluster cannot read)."""
    from safetensors.torch import save_file
    save_file(tensors, path, metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


def staging_path(path) -> Path:
    """Where PATH is built before its rename: .NAME.tmp beside it. The name is fixed so that every process of a
    distributed save finds the same folder."""
    path = Path(path)
    return path.parent / f".{path.name}.tmp"


def staging_folder(path) -> Path:
    """A fresh, empty staging folder for PATH (a leftover of an interrupted write is removed)."""
    tmp = staging_path(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_folder(path, replace: bool = False) -> Path:
    """Rename PATH's staging folder to PATH. An existing PATH is refused unless `replace` (then it is swapped out
    through PATH.old, removed last)."""
    path = Path(path)
    tmp, old = staging_path(path), path.parent / f"{path.name}.old"
    if path.exists():
        if not replace:
            raise FileExistsError(f"{path} exists; refusing to overwrite it")
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path


@contextmanager
def atomic_folder(path, replace: bool = False):
    """with atomic_folder(PATH) as tmp: write files into tmp; PATH appears whole when the block ends without error
    (on error the staging folder is removed and PATH is untouched)."""
    if Path(path).exists() and not replace:  # refused before anything is written
        raise FileExistsError(f"{path} exists; refusing to overwrite it")
    tmp = staging_folder(path)
    try:
        yield tmp
        commit_folder(path, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def finished_folder(path, required: str) -> Path | None:
    """PATH if it holds `required`, else PATH.old if a replacement was interrupted between its two renames."""
    path = Path(path)
    for candidate in (path, path.parent / f"{path.name}.old"):
        if (candidate / required).is_file():
            return candidate
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------------------------------------------------
# One run per folder: a lock file naming its owner


class FolderInUse(RuntimeError):
    """Another live process holds the folder's lock."""


@contextmanager
def folder_lock(folder, what: str = "run"):
    """Hold FOLDER/.lock (pid, host, start time) while the block runs. A second process is refused at once with one
    line naming the holder; a lock left by a process that no longer exists on this host is taken over (with a
    message on stderr). The folder is created if needed."""
    import json
    import socket
    import sys
    import time
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".lock"
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, ValueError):
                holder = {}
            if holder.get("host") == me["host"] and not _alive(holder.get("pid")):
                print(f"note: {lock}: taking over the lock of process {holder.get('pid')}, which no longer runs",
                      file=sys.stderr)
                lock.unlink(missing_ok=True)
                continue
            raise FolderInUse(f"{folder} is in use by another {what}: process {holder.get('pid', '?')} on "
                              f"{holder.get('host', '?')} since {holder.get('started', '?')} (remove {lock} if "
                              f"that process is gone)") from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        break
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

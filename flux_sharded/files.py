"""Safe file output: writability probes that leave no trace, atomic writes, and the user's cache folder."""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path
from typing import Callable

from .errors import SettingsError


def check_writable_folder(folder: Path, option: str, keep_created_folders: bool = False) -> None:
    """Prove `folder` can take files by writing one, then undo everything the probe created (but
    the folders, with keep_created_folders: several processes probe the same folder at once)."""
    try:
        os.fsencode(folder).decode("utf-8")
    except UnicodeDecodeError:  # safetensors and JSON take UTF-8 names only: every handoff would be unreadable
        raise SettingsError(f"{option}: {os.fsencode(folder)!r} is not a UTF-8 path; give a folder whose name is "
                            "UTF-8") from None
    if folder.exists() and not folder.is_dir():
        raise SettingsError(f"{option}: '{folder}' is a file, not a folder; give a folder")
    target = folder.absolute()
    created = [path for path in (target, *target.parents) if not path.exists()]  # deepest first
    try:
        target.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".flux-sharded-probe-", dir=target)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise SettingsError(
            f"{option}: cannot write in '{folder}' ({error.strerror}); choose a folder you can write to"
        ) from None
    finally:
        for path in [] if keep_created_folders else created:
            try:
                path.rmdir()
            except OSError:  # gone already, or someone else's files arrived in it
                pass


def user_cache_dir() -> Path:
    """flux-sharded's folder in the user's cache: $XDG_CACHE_HOME/flux-sharded, else ~/.cache/flux-sharded
    (the key that seals run folders, seal.py; the weights' digests, digests.py)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flux-sharded"


def atomic_write(target: Path, write: Callable[[str], None]) -> None:
    """`write(tmp_path)` to a temporary name beside `target`, fsync, rename: never half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # pid and a random part: processes of several machines may write into one shared folder
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        write(str(tmp))
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()

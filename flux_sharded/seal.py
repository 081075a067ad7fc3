"""Seals: which files of a run folder this user's flux-sharded wrote, byte for byte.

Every file `--resume` reads from a run folder (run.json, each handoff's JSON and tensors, each kept
batch of latents) carries a seal: an HMAC-SHA256, keyed by a secret of this user's (`key_path()`,
in the user's cache folder, made on first use), of the file's name and every byte of the file, the
seal's own 64 hex digits read as zeros. A resume checks the seal before it uses anything in the
file: a file changed by a single byte, edited by hand, or taken from another run folder of another
user is refused, never used.

Why a keyed HMAC and not SHA-256 digests in a manifest: whoever edits a file can recompute its
digest (a run.json whose settings or out_dir were changed, its digest with them), and a folder
copied from someone else carries digests that match its own files; only a key the folder does not
hold tells this user's files from any others. Why inside each file (a JSON field, a safetensors
metadata entry) and not in a manifest: the processes of a run write their own files at the same
time, and one more shared file would be one more thing to write in order and to lose to a kill; a
file written whole (files.atomic_write) is sealed whole, before it takes its name. The name is
sealed with the bytes, so that one of the run's files cannot stand in for another (an encode
handoff for a denoise one, one process's share for another's). What a seal cannot tell (a file of
this user's other run with the same name) the files' contents tell: a handoff's JSON names the seal
of its tensors file, the weights and the settings it was made with (rundir.py).

Machines that write one run folder together must share the key file (a shared home does; else copy
it): a file sealed under another key is refused as not written by this user.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Callable

from .errors import OutputError, SettingsError
from .files import atomic_write, user_cache_dir
from .safe_read import NotARegularFile, read_regular_file

# What a writer puts where the seal goes; seal_file replaces the zeros. A prefix of our own, so that
# the seal is found the same way in JSON (`"seal": "..."`) and in a safetensors header.
PLACEHOLDER = "flux-sharded-seal:" + "0" * 64
_SEAL = re.compile(rb"flux-sharded-seal:([0-9a-f]{64})")
# The seal is the first field of our JSON files and sits in a safetensors header's __metadata__,
# which safetensors writes first: within the first bytes of every file we seal.
SEAL_WITHIN_BYTES = 64 * 1024
_CHUNK = 2**20
KEY_FILE = "run-folder-key"


class SealError(ValueError):
    """A file without a seal of ours, or whose bytes do not match it; the text says which."""


def key_path() -> Path:
    return user_cache_dir() / KEY_FILE


@functools.lru_cache(maxsize=None)
def _key(path: Path) -> bytes:
    """The 32-byte key in `path`, made there (mode 0600) if there is none. Processes that start at
    once make one each and keep the first to take the name (os.link does not replace)."""
    try:
        try:
            text = read_regular_file(path, 1024)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            temporary = path.with_name(f".{KEY_FILE}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
            handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(handle, secrets.token_hex(32).encode() + b"\n")
                os.fsync(handle)
            finally:
                os.close(handle)
            try:
                os.link(temporary, path)
            except FileExistsError:  # another process made it first: its key is the one
                pass
            finally:
                temporary.unlink()
            text = read_regular_file(path, 1024)
    except (OSError, ValueError) as error:
        if isinstance(error, (NotARegularFile, IsADirectoryError, ValueError)):
            text = b""  # refused below as damaged
        else:
            raise OutputError(f"cannot read or make the key that seals run folders, {path} "
                              f"({getattr(error, 'strerror', None) or error}); make {path.parent} a folder you can "
                              "write (or set XDG_CACHE_HOME to one)") from None
    key = text.strip()
    if not re.fullmatch(rb"[0-9a-f]{64}", key):
        raise SettingsError(f"the key that seals run folders, {path}, is damaged (not 64 hex digits); delete it (a new "
                            "one is made; run folders sealed with the old one can then not be resumed)")
    return bytes.fromhex(key.decode())


def _keep_private(path: Path) -> None:
    """The key made readable by others (a copy with cp, a umask of 022 and an editor's save) lets
    them seal files this user's resumes would take: it is made 0600 again, as it was made. Not ours
    to change (another owner's), it is left as it is."""
    try:
        mode = os.lstat(path).st_mode
        if stat.S_ISREG(mode) and mode & 0o077:  # a link's target is not ours to change
            os.chmod(path, 0o600)
    except OSError:
        pass


def check_key() -> None:
    """The user's key is readable and whole (made if there is none); else the error _key raises.
    A new run checks it before it makes its run folder, so that a damaged key leaves nothing behind."""
    _key(key_path())


def _mac(name: str, head: bytes, start: int, end: int, rest) -> str:
    """HMAC of `name` and the bytes `head` + `rest` (an iterable of chunks), head[start:end] read as zeros."""
    path = key_path()
    _keep_private(path)  # each time: the key is read once per process
    mac = hmac.new(_key(path), name.encode("utf-8", "surrogateescape") + b"\0", hashlib.sha256)
    mac.update(head[:start])
    mac.update(b"0" * (end - start))
    mac.update(head[end:])
    for chunk in rest:
        mac.update(chunk)
    return mac.hexdigest()


def seal_file(path: str | os.PathLike, name: str) -> str:
    """Seal the file at `path`, which will be known as `name` (a temporary file of atomic_write's),
    in place: its first PLACEHOLDER becomes the seal. Returns the seal (64 hex digits)."""
    with open(path, "rb+") as file:
        head = file.read(SEAL_WITHIN_BYTES)
        start = head.find(PLACEHOLDER.encode())
        if start < 0:
            raise ValueError(f"{name}: no seal placeholder in its first {SEAL_WITHIN_BYTES} bytes")  # a bug of ours
        start += len(PLACEHOLDER) - 64
        value = _mac(name, head, start, start + 64, iter(lambda: file.read(_CHUNK), b""))
        file.seek(start)
        file.write(value.encode())
    return value


def sealed_write(target: Path, write: Callable[[str], None]) -> str:
    """files.atomic_write, the file sealed before it takes its name (its content must hold
    PLACEHOLDER within its first SEAL_WITHIN_BYTES). Returns the seal."""
    sealed = []
    atomic_write(target, lambda tmp: (write(tmp), sealed.append(seal_file(tmp, target.name))))
    return sealed[0]


def check_seal(path: Path, data: bytes | None = None) -> str:
    """The seal of the file at `path` (its bytes `data`, if read already), checked against every
    byte and the file's name; raises SealError saying what is wrong, OSError if it cannot be read."""
    if data is not None:
        return _checked(path.name, data, iter(()))
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the open
        raise NotARegularFile(f"{path} is not a regular file (a pipe, a device or a socket)")
    with open(path, "rb") as file:
        return _checked(path.name, file.read(SEAL_WITHIN_BYTES), iter(lambda: file.read(_CHUNK), b""))


def _checked(name: str, head: bytes, rest) -> str:
    found = _SEAL.search(head[:SEAL_WITHIN_BYTES])
    if found is None:
        raise SealError("carries no seal of flux-sharded's (written by an earlier version, or not by flux-sharded)")
    if not key_path().exists():  # a new key would be made, and every seal read as "changed"
        raise SealError(f"cannot be checked: the key that sealed it, {key_path()}, is gone (the user's cache folder "
                        "was cleared, or the run folder was made on another machine or by another user: copying "
                        "that key file back lets it be resumed)")
    if not hmac.compare_digest(_mac(name, head, found.start(1), found.end(1), rest).encode(), found.group(1)):
        raise SealError(f"does not match its seal: it was changed after flux-sharded wrote it, or it was sealed with "
                        f"another key than this user's ({key_path()})")
    return found.group(1).decode()

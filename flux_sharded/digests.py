"""Whole-file SHA-256 digests of a model's files, each file version read at most once.

A run records the digest of every weight and config file it uses (checkpoint.weights_fingerprint),
and a resume refuses weights that differ by a single byte anywhere. Reading FLUX.1-dev's 33 GB
at every start would delay the first image by minutes, so:

- a file of a Hugging Face cache (a snapshot's link to `blobs/<64 hex digits>`) is named by its
  SHA-256, the hub's content hash of an LFS file: the first time a new run sees it, its name is its
  digest and nothing is read (a check against a run's recorded digests hashes a blob it has no
  record of: file_digests' trust_blob_names);
- any other file is hashed whole, once (a small one every time: cheaper than a cache entry);
- the digest is recorded in the user's cache folder (DIGESTS_FILE) under the file's real path with
  its identity: device, inode, size, mtime_ns and ctime_ns. A file whose identity is unchanged is
  not read again; one whose identity changed (rewritten, or edited in place: the kernel sets ctime
  on every write, even one whose mtime is put back) is hashed whole again, a blob as well, so a
  change between a run's start and its resume is found. A file changed within RACY_NS before it was
  recorded may be changed again within the same tick of the file system's clock without a new
  identity (git's "racy" files): its record is not trusted, it is hashed again next time.

The record is a cache: lost or damaged, it is rebuilt by hashing; processes that write it at once
each replace it whole (files.atomic_write), and the last one's entries are kept.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import time
from pathlib import Path

from .files import atomic_write, user_cache_dir
from .safe_read import parse_json, read_regular_file

DIGESTS_FILE = "file-digests.json"
# Files smaller than this are hashed on every call (configs, tokenizers: milliseconds); larger ones
# are recorded.
RECORD_FROM_BYTES = 2**20
MAX_RECORDS = 10_000  # the oldest are dropped beyond: far more weight files than any user keeps
MAX_RECORD_FILE_BYTES = 16 * 2**20
# File systems keep times in ticks of up to a few milliseconds (FAT: 2 s for mtime); a second is
# far more than a tick on any Linux file system and costs one more hash of a file written just now.
RACY_NS = 2 * 10**9
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 8 * 2**20


def _identity(stat: os.stat_result) -> list[int]:
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def _hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _records_path() -> Path:
    return user_cache_dir() / DIGESTS_FILE


def _read_records() -> dict:
    try:
        data = parse_json(read_regular_file(_records_path(), MAX_RECORD_FILE_BYTES).decode("utf-8"))
    except (OSError, ValueError):  # none yet, or damaged: rebuilt by hashing
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    return {path: entry for path, entry in files.items()
            if isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and _HEX64.fullmatch(entry["sha256"])
            and isinstance(entry.get("identity"), list)} if isinstance(files, dict) else {}


def _write_records(records: dict) -> None:
    kept = dict(list(records.items())[-MAX_RECORDS:])
    try:
        atomic_write(_records_path(), lambda tmp: Path(tmp).write_text(json.dumps({"files": kept})))
    except OSError:  # a cache that cannot be written costs a hash next time, nothing else
        pass


def file_digests(paths: list[Path], trust_blob_names: bool = False) -> dict[Path, str]:
    """The SHA-256 (64 hex digits) of each file's whole content, as this module's docstring says;
    raises OSError for a file that cannot be read. `trust_blob_names`: a blob without a record of
    its identity is taken by its name; only a new run's first look passes True. A check against
    digests recorded earlier (a resume, the check before each stage) must not: with the record lost
    (the cache folder cleared), a blob changed since would pass for the one the run used."""
    records = _read_records()
    digests, to_hash, seen = {}, {}, {}
    for path in paths:
        real = path.resolve()
        stat = os.stat(real)
        if stat.st_size < RECORD_FROM_BYTES:
            to_hash[path] = real
            continue
        identity, entry = _identity(stat), records.get(str(real))
        if entry is not None and entry["identity"] == identity and entry.get("racy") is False:
            digests[path] = entry["sha256"]
            continue
        # A blob seen for the first time is taken by its name; one seen before with another
        # identity has changed since, and its name no longer vouches for it.
        named = real.parent.name == "blobs" and _HEX64.fullmatch(real.name)
        if named and entry is None and trust_blob_names:
            digests[path] = real.name
        else:
            to_hash[path] = real
        seen[path] = (real, stat)
    # hashlib lets go of the GIL while it hashes: a checkpoint's shards are hashed side by side
    # (FLUX.1-dev's 33 GB in seven large files), bound by the disk rather than one core's SHA-256.
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(len(to_hash), os.cpu_count() or 1))) as pool:
        digests.update(zip(to_hash, pool.map(_hash, to_hash.values())))
    for path, (real, stat) in seen.items():
        records.pop(str(real), None)  # re-inserted last: the newest are kept
        records[str(real)] = {"identity": _identity(stat), "sha256": digests[path],
                              "racy": time.time_ns() - stat.st_ctime_ns < RACY_NS}
    changed = bool(seen)
    if changed:
        _write_records(records)
    return digests

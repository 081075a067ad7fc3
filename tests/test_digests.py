"""The weights' digests (digests.py): whole files, a hub blob by its name, each version read once,
and a change anywhere found even when the file keeps its size and mtime."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from flux_sharded.digests import DIGESTS_FILE, RECORD_FROM_BYTES, file_digests
from flux_sharded.files import user_cache_dir

BIG = bytes(range(256)) * (2 * RECORD_FROM_BYTES // 256)  # recorded, not hashed on every call


def flip_middle_byte_keeping_mtime(path: Path) -> bytes:
    """One byte in the middle of `path` changed in place, its size and mtime as they were."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    with open(path, "r+b") as file:
        file.seek(len(data) // 2)
        file.write(bytes([data[len(data) // 2]]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    return bytes(data)


def test_a_byte_changed_in_the_middle_of_a_weight_file_is_found(tmp_path):
    """Not the first and last 64 KiB only: the whole file, even with its size and mtime put back."""
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    path.write_bytes(BIG)
    assert file_digests([path]) == {path: hashlib.sha256(BIG).hexdigest()}
    changed = flip_middle_byte_keeping_mtime(path)
    assert file_digests([path]) == {path: hashlib.sha256(changed).hexdigest()}


def test_a_hub_blob_is_taken_by_its_name_and_hashed_once_it_changed(tmp_path):
    """The name of a Hugging Face cache blob is its content's SHA-256: the first time, nothing is
    read (a blob named otherwise than its content gives its name); changed in place afterwards, it is
    hashed whole."""
    blobs, snapshot = tmp_path / "models--o--m" / "blobs", tmp_path / "models--o--m" / "snapshots" / "abc" / "vae"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    name = "a" * 64
    (blobs / name).write_bytes(BIG)
    link = snapshot / "diffusion_pytorch_model.safetensors"
    link.symlink_to(os.path.relpath(blobs / name, snapshot))
    assert file_digests([link], trust_blob_names=True) == {link: name}
    changed = flip_middle_byte_keeping_mtime(blobs / name)
    assert file_digests([link]) == {link: hashlib.sha256(changed).hexdigest()}


def test_a_file_recorded_with_its_identity_is_not_read_again(tmp_path):
    """A second run does not hash the weights again: the record of a file whose device, inode,
    size, mtime and ctime are unchanged (and not written within a tick of being recorded) is taken."""
    path = tmp_path / "weights.safetensors"
    path.write_bytes(BIG)
    stat = path.stat()
    record = {"identity": [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns],
              "sha256": "b" * 64, "racy": False}
    user_cache_dir().mkdir(parents=True, exist_ok=True)
    (user_cache_dir() / DIGESTS_FILE).write_text(json.dumps({"files": {str(path.resolve()): record}}))
    assert file_digests([path]) == {path: "b" * 64}
    path.write_bytes(BIG + b"!")  # another identity (its size): read again
    assert file_digests([path]) == {path: hashlib.sha256(BIG + b"!").hexdigest()}


def test_a_damaged_record_file_costs_a_hash_and_nothing_else(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(BIG)
    user_cache_dir().mkdir(parents=True, exist_ok=True)
    (user_cache_dir() / DIGESTS_FILE).write_text('{"files": ' + "[" * 100 + "]" * 100 + "}")
    assert file_digests([path]) == {path: hashlib.sha256(BIG).hexdigest()}


def test_a_blob_without_a_record_is_hashed_when_a_check_asks_for_it(tmp_path):
    """Only a new run takes a blob never seen before by its name: a check against a run's recorded
    digests (trust_blob_names False) hashes it, so a blob changed after the record was lost (the
    cache folder cleared) is found."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    name = hashlib.sha256(BIG).hexdigest()
    (blobs / name).write_bytes(BIG)
    changed = flip_middle_byte_keeping_mtime(blobs / name)
    (user_cache_dir() / DIGESTS_FILE).unlink(missing_ok=True)
    assert file_digests([blobs / name], trust_blob_names=True) == {blobs / name: name}  # a new run: its name
    (user_cache_dir() / DIGESTS_FILE).unlink()
    assert file_digests([blobs / name]) == {blobs / name: hashlib.sha256(changed).hexdigest()}  # any check


def test_a_weights_fingerprint_hashes_a_blob_it_has_no_record_of_unless_a_new_run_asks(tmp_path):
    """checkpoint.weights_fingerprint, as a resume and the check before each stage call it, after a
    transformer blob changed (size and mtime kept) and the user's cache folder was cleared: the
    blob's content, not its name, so check_same_weights refuses it; the runner's new run alone
    passes trust_blob_names (a first run does not read 24 GB to learn what the hub named it)."""
    from flux_sharded.checkpoint import weights_fingerprint

    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / ("0" * 40)
    blobs.mkdir()
    (snapshot / "transformer").mkdir(parents=True)
    name = hashlib.sha256(BIG).hexdigest()
    (blobs / name).write_bytes(BIG)
    (snapshot / "transformer" / "diffusion_pytorch_model.safetensors").symlink_to(blobs / name)
    recorded = weights_fingerprint(snapshot, trust_blob_names=True)
    assert recorded["transformer"]["diffusion_pytorch_model.safetensors"]["sha256"] == name
    changed = flip_middle_byte_keeping_mtime(blobs / name)
    (user_cache_dir() / DIGESTS_FILE).unlink()
    assert weights_fingerprint(snapshot)["transformer"]["diffusion_pytorch_model.safetensors"]["sha256"] == (
        hashlib.sha256(changed).hexdigest())

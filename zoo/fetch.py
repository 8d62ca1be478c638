"""`zoo fetch`: download a spec's published weights file, check its hash, convert it into the store (zoo.store).

A spec's provenance lists its published files (`reference_files`: URL, hashes, weight source, licence). The
download goes to `<store>/downloads/<file>.part`; a broken one is resumed from where it stopped (HTTP Range).
The whole file's hash is checked before any reader opens it: a file whose hash is not the published one is
deleted (its bytes cannot be trusted, so neither can any part of them) and nothing is stored. Only then is
it renamed to `<file>`, converted with the spec and the weight source the provenance names, stored, and
deleted. A mirror (`--mirror`, ZOO_MIRROR) is a base URL serving the files by name: BASE/<file>.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from zoo import store
from zoo.errors import ZooError
from zoo.progress import bar
from zoo.registry import get_spec
from zoo.spec import ModelSpec
from zoo.specs.builders import HASHES
from zoo.weights import file_digest

TIMEOUT = (30, 60)  # seconds to connect, and between bytes
CHUNK = 1 << 16  # bytes per write; a dropped connection loses the chunk it was in, so it stays small


@dataclass
class Fetched:
    entry: store.Entry
    url: str
    hash_check: str  # what was checked, for the user
    downloaded: bool  # False when the store already held it


def published(spec: ModelSpec, file: str | None = None) -> tuple[str, dict]:
    """(file name, its provenance entry): `file`, else the first published file with a URL."""
    files = spec.provenance.get("reference_files", {})
    if file is None:
        file = next((name for name, entry in files.items() if "url" in entry), None)
        if file is None:
            raise ZooError(f"{spec.id} lists no published file to download; convert one you have: zoo convert FILE --store")
    elif file not in files:
        raise ZooError(f"{spec.id} has no published file {file!r}; it lists: {', '.join(files) or 'none'}")
    if "url" not in files[file]:
        raise ZooError(f"{spec.id}'s published {file} has no known URL; convert a copy you have: zoo convert {file} --store")
    return file, files[file]


def file_url(url: str, file: str, mirror: str | None) -> str:
    return f"{mirror.rstrip('/')}/{file}" if mirror else url


def fetch(model: str, file: str | None = None, mirror: str | None = None) -> Fetched:
    """Download, check, convert and store `model`'s published `file` (default: its first); see the module doc."""
    from zoo.conversion import weight_sources

    spec = get_spec(model)
    file, entry = published(spec, file)
    if entry["source"] not in weight_sources():
        raise ZooError(f"{file} is read by weight source {entry['source']!r}, which no installed plugin provides (zoo plugins)")
    url = file_url(entry["url"], file, mirror or os.environ.get("ZOO_MIRROR"))
    downloads = store.home() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    with _locked(downloads / f".{file}.lock"):  # one download of a file at a time: both would append to one .part
        have = [e for e in store.find(spec.id) if e.current and e.metadata.get("source_file") == file]
        if have:
            return Fetched(have[0], url, "stored before", False)
        dest = downloads / file
        check = verify(dest, entry) if dest.exists() else _download_checked(url, dest, entry)  # kept: its conversion failed
        _, stored = store.add(dest, source=entry["source"], spec=spec, sha256=True)
        dest.unlink()  # the store holds the verified conversion, with the source's sha256
    return Fetched(stored, url, check, True)


@contextmanager
def _locked(path: Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # waits for another zoo fetch of the same file; released on close
        yield


def _download_checked(url: str, dest: Path, entry: dict) -> str:
    part = dest.with_name(dest.name + ".part")
    download(url, part)
    check = verify(part, entry)
    os.replace(part, dest)
    return check


def verify(path: Path, entry: dict) -> str:
    """Check `path` against the published hash (the first the entry gives); a mismatch deletes it."""
    for key in HASHES:
        if key in entry:
            algorithm = key.removesuffix("_prefix")
            digest = file_digest(path, algorithm)
            if not (digest.startswith(entry[key]) if key == "sha256_prefix" else digest == entry[key]):
                path.unlink()
                raise ZooError(f"{algorithm} {digest} is not the published {entry[key]}: a different or corrupted file; "
                               f"deleted, nothing stored", path.with_suffix(""))
            return f"{algorithm} {entry[key]} as published"
    return "no published hash to check against (its sha256 is recorded)"


def download(url: str, part: Path) -> None:
    """Download `url` into `part`, continuing a partial one; an error keeps what arrived, to be resumed."""
    import requests

    have = part.stat().st_size if part.exists() else 0
    headers = {"Accept-Encoding": "identity"} | ({"Range": f"bytes={have}-"} if have else {})  # bytes as stored: resumable
    try:
        with requests.get(url, headers=headers, stream=True, timeout=TIMEOUT) as response:
            if response.status_code == 416 and have:  # nothing left to send: the part is whole (the hash decides)
                return
            if response.status_code >= 400:
                raise ZooError(f"HTTP {response.status_code} {response.reason}", url)
            have = _continued(response, have, part)
            size = int(response.headers.get("Content-Length", -1))
            with open(part, "ab" if have else "wb") as f, bar(have + size if size >= 0 else None, f"downloading {part.stem}", "B") as progress:
                progress.update(have)
                for chunk in response.iter_content(CHUNK):
                    f.write(chunk)
                    progress.update(len(chunk))
    except requests.RequestException as e:
        kept = part.stat().st_size if part.exists() else 0
        raise ZooError(f"download failed ({_reason(e)}) after {kept:,} bytes; run zoo fetch again to resume", url) from None


def _continued(response, have: int, part: Path) -> int:
    """Bytes of `part` the response continues: `have` for the range asked for, 0 for the whole file again."""
    if response.status_code != 206:
        return 0  # the server ignored Range: start over
    if not response.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
        part.unlink()
        raise ZooError(f"the server sent another range than bytes {have}-; the partial download is deleted, run zoo fetch again",
                       response.url)
    return have


def _reason(e) -> str:
    import requests

    for kind, reason in ((requests.Timeout, "timed out"), (requests.exceptions.ChunkedEncodingError, "connection dropped"),
                         (requests.ConnectionError, "cannot connect")):
        if isinstance(e, kind):
            return reason
    return type(e).__name__

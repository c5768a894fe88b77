"""Files under a location that is either a local directory or `gs://bucket/prefix`.

Only what checkpoints and artifacts need: write and read small files, upload and download files,
list (recursively, with sizes) and delete. google-cloud-storage is imported here and only when a
`gs://` location is used; `storage.Client()` honours `STORAGE_EMULATOR_HOST`, which is how the
tests point it at a local fake-gcs-server.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol


class Location(Protocol):
    uri: str

    def child(self, name: str) -> Location: ...

    def write_bytes(self, name: str, data: bytes) -> None: ...

    def read_bytes(self, name: str) -> bytes:
        """Raises FileNotFoundError when there is no such file."""
        ...

    def upload(self, local: Path, name: str) -> None: ...

    def download(self, name: str, local: Path) -> None: ...

    def list(self) -> dict[str, int]:
        """Every file under this location: relative name (with '/') → size in bytes."""
        ...

    def delete(self) -> None:
        """Remove everything under this location."""
        ...


def is_gcs(uri: str) -> bool:
    return uri.startswith("gs://")


def open_location(uri: str | Path) -> Location:
    text = str(uri)
    if is_gcs(text):
        bucket, _, prefix = text[len("gs://") :].partition("/")
        if not bucket:
            raise ValueError(f"{text}: no bucket name after gs://")
        return GcsLocation(bucket, prefix.strip("/"))
    if "://" in text:
        raise ValueError(f"{text}: only local paths and gs:// URIs are supported")
    return LocalLocation(Path(text))


class LocalLocation:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.uri = str(self.root)

    def child(self, name: str) -> LocalLocation:
        return LocalLocation(self.root / name)

    def write_bytes(self, name: str, data: bytes) -> None:
        target = self.root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a reader never sees half a file (a manifest above all).
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def read_bytes(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def upload(self, local: Path, name: str) -> None:
        target = self.root / name
        if target.resolve() == Path(local).resolve():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.partial")
        shutil.copyfile(local, tmp)
        os.replace(tmp, target)

    def download(self, name: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.root / name, local)

    def list(self) -> dict[str, int]:
        if not self.root.is_dir():
            return {}
        return {
            p.relative_to(self.root).as_posix(): p.stat().st_size
            for p in self.root.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        }

    def delete(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


_client: Any = None


def _gcs_client() -> Any:
    global _client
    if _client is None:
        from google.cloud import storage  # type: ignore[attr-defined,unused-ignore]

        _client = storage.Client()
    return _client


class GcsLocation:
    def __init__(self, bucket: str, prefix: str) -> None:
        self.bucket_name = bucket
        self.prefix = prefix
        self.uri = f"gs://{bucket}/{prefix}" if prefix else f"gs://{bucket}"

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _blob(self, name: str) -> Any:
        return _gcs_client().bucket(self.bucket_name).blob(self._key(name))

    def child(self, name: str) -> GcsLocation:
        return GcsLocation(self.bucket_name, self._key(name.strip("/")))

    def write_bytes(self, name: str, data: bytes) -> None:
        # An object appears whole or not at all, so no write-then-rename is needed.
        self._blob(name).upload_from_string(data, content_type="application/octet-stream")

    def read_bytes(self, name: str) -> bytes:
        from google.api_core.exceptions import NotFound

        try:
            data: bytes = self._blob(name).download_as_bytes()
        except NotFound as exc:
            raise FileNotFoundError(f"{self.uri}/{name}") from exc
        return data

    def upload(self, local: Path, name: str) -> None:
        self._blob(name).upload_from_filename(str(local))

    def download(self, name: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        self._blob(name).download_to_filename(str(local))

    def list(self) -> dict[str, int]:
        start = f"{self.prefix}/" if self.prefix else ""
        out = {}
        for blob in _gcs_client().list_blobs(self.bucket_name, prefix=start):
            out[blob.name[len(start) :]] = int(blob.size or 0)
        return out

    def delete(self) -> None:
        start = f"{self.prefix}/" if self.prefix else ""
        bucket = _gcs_client().bucket(self.bucket_name)
        for blob in list(_gcs_client().list_blobs(self.bucket_name, prefix=start)):
            bucket.blob(blob.name).delete()


def upload_tree(local_dir: Path, location: Location) -> list[str]:
    """Upload every file under `local_dir`; returns the names uploaded."""
    names = []
    for path in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
        name = path.relative_to(local_dir).as_posix()
        location.upload(path, name)
        names.append(name)
    return names

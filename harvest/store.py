"""Where a cache lives: a local folder, or a prefix in an object store (`s3://bucket/prefix`,
`gs://bucket/prefix`, and S3-compatible stores such as MinIO or Ceph through AWS_ENDPOINT_URL).

Object stores go through obstore (`pip install -e '.[s3]'`) under zarr's own `ObjectStore`, configured
the standard way, from the environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
AWS_REGION, AWS_ENDPOINT_URL (an `http://` endpoint is allowed as given), instance and container
roles, web identity; for `gs://`, GOOGLE_APPLICATION_CREDENTIALS (or GOOGLE_SERVICE_ACCOUNT) or the
machine's default credentials. Every chunk file is one object written whole in one PUT: an object
store never shows a partial object, so the rules of the local cache hold (owners write whole chunks,
then flags). Failed requests are retried with backoff for up to JUMPSCOPE_STORE_RETRY_SECONDS
(default 180) before the harvest stops with a clear message; it then resumes with the same command.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import zarr

SCHEMES = ("s3", "gs")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
RETRY_ENV = "JUMPSCOPE_STORE_RETRY_SECONDS"


class ObjectStoreError(RuntimeError):
    """The object store refused or failed a request: credentials, bucket, permissions, network."""


def is_url(cache: str) -> bool:
    return _URL.match(str(cache)) is not None


def _endpoint() -> str | None:
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"):
        if os.environ.get(name):
            return os.environ[name]
    return None


def open_object_store(url: str):
    """The obstore store for `url` (its path is the store's prefix), from the environment's settings."""
    try:
        from obstore.store import from_url
    except ImportError:
        raise ObjectStoreError(f"CACHE={url} is in an object store, which needs obstore: "
                               "pip install -e '.[s3]' (make installs it when CACHE is a URL)") from None
    kwargs = {}
    if url.startswith("s3://") and (_endpoint() or "").startswith("http://"):
        kwargs["client_options"] = {"allow_http": True}     # the user chose a plain-HTTP endpoint
    if os.environ.get(RETRY_ENV):
        kwargs["retry_config"] = {"max_retries": 10, "retry_timeout": timedelta(seconds=float(os.environ[RETRY_ENV]))}
    try:
        return from_url(url, **kwargs)
    except Exception as e:
        raise ObjectStoreError(f"cannot open {url}: {first_line(e)}") from e


def first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def describe_store_error(e: BaseException, where: str, doing: str) -> str:
    """A one-paragraph account of a failed object-store request, saying what to check."""
    text = str(e)
    code = re.search(r"<Code>([^<]+)</Code>", text)
    code = code.group(1) if code else ""
    bucket = where.split("://", 1)[-1].split("/", 1)[0]
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken") or \
            type(e).__name__ == "UnauthenticatedError":
        return (f"{doing} {where}: the object store rejected the credentials ({code or 'unauthenticated'}). "
                "Check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN (gs://: "
                "GOOGLE_APPLICATION_CREDENTIALS).")
    if code == "NoSuchBucket":
        return f"{doing} {where}: the bucket {bucket!r} does not exist{_at()}. Create it, or fix CACHE."
    if code == "AccessDenied" or type(e).__name__ == "PermissionDeniedError":
        return (f"{doing} {where}: permission denied{_at()}: these credentials may not "
                f"{'write' if doing.startswith(('writ', 'creat', 'updat', 'remov')) else 'read'} under this "
                "prefix. Use a prefix you may write to, or other credentials.")
    if "error sending request" in text or "RetryError" in text or "Connect" in text or "timed out" in text:
        return (f"{doing} {where}: could not reach the object store{_at()} ({first_line(e)}). "
                "Check the network and AWS_ENDPOINT_URL.")
    return f"{doing} {where}: {first_line(e)}"


def _at() -> str:
    return f" at {_endpoint()}" if _endpoint() else ""


def is_store_error(e: BaseException) -> bool:
    return type(e).__module__.startswith("obstore") or isinstance(e, ObjectStoreError) or (
        isinstance(e, (FileNotFoundError, PermissionError)) and "Error performing" in str(e))


@dataclass
class CacheLocation:
    """CACHE as given: a local folder (`path`) or an object-store prefix (`url`)."""
    cache: str
    path: Path | None = None
    url: str | None = None
    _store: object = field(default=None, repr=False)

    @classmethod
    def parse(cls, cache) -> "CacheLocation":
        cache = str(cache)
        m = _URL.match(cache)
        if m is None:
            if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/[^/]", cache):
                raise ObjectStoreError(f"CACHE={cache} looks like an object-store URL with one slash; "
                                       f"did you mean {cache.replace(':/', '://', 1)}?")
            return cls(cache=cache, path=Path(cache))
        scheme, rest = m.group(1).lower(), m.group(2)
        if scheme not in SCHEMES:
            raise ObjectStoreError(f"CACHE={cache}: {scheme}:// is not supported; CACHE is a local path, "
                                   "s3://bucket/prefix or gs://bucket/prefix")
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ObjectStoreError(f"CACHE={cache} names no bucket: s3://bucket/prefix")
        prefix = prefix.strip("/")
        return cls(cache=cache, url=f"{scheme}://{bucket}" + (f"/{prefix}" if prefix else ""))

    @property
    def remote(self) -> bool:
        return self.url is not None

    def __str__(self) -> str:
        return self.url or str(self.path)

    @property
    def object_store(self):
        if self._store is None:
            self._store = open_object_store(self.url)
        return self._store

    def zarr_store(self, read_only: bool = False):
        """What zarr opens: the local path (zarr's LocalStore) or zarr's ObjectStore over obstore."""
        if not self.remote:
            return str(self.path)
        from zarr.storage import ObjectStore
        return ObjectStore(self.object_store, read_only=read_only)

    def open_group(self, mode: str = "r") -> zarr.Group:
        return zarr.open_group(store=self.zarr_store(read_only=mode == "r"), mode=mode)

    def call(self, doing: str, fn, *args, **kwargs):
        """fn(*args, **kwargs), object-store failures turned into an ObjectStoreError that says what to check."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if self.remote and is_store_error(e) and not isinstance(e, ObjectStoreError):
                raise ObjectStoreError(describe_store_error(e, str(self), doing)) from e
            raise

    def has_group(self) -> bool:
        if not self.remote:
            return (self.path / "zarr.json").exists()
        return "zarr.json" in (self.entries() or [])

    def entries(self) -> list[str] | None:
        """The names at the top of the location (folders and common prefixes end with /); None for a file."""
        if not self.remote:
            if self.path.exists() and not self.path.is_dir():
                return None
            if not self.path.is_dir():
                return []
            return sorted(p.name + ("/" if p.is_dir() else "") for p in self.path.iterdir())
        import obstore
        listing = self.call("listing", obstore.list_with_delimiter, self.object_store)
        return sorted([p.rstrip("/").rsplit("/", 1)[-1] + "/" for p in listing["common_prefixes"]]
                      + [o["path"].rsplit("/", 1)[-1] for o in listing["objects"]])

    def free_bytes(self) -> int | None:
        """Free space on the local disk; None for an object store (it has no such limit to check)."""
        if self.remote:
            return None
        import shutil
        p = self.path.resolve()
        while not p.exists():
            p = p.parent
        return shutil.disk_usage(p).free

    def bytes_stored(self) -> int:
        if not self.remote:
            return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
        import obstore
        return sum(o["size"] for batch in self.call("listing", obstore.list, self.object_store, chunk_size=1000)
                   for o in batch)

"""Object storage: the local filesystem (embedded default) or S3 behind one interface.

Workers upload encoded segments, the stitcher reads them back, jobs fetch latents and
model weights; all of them name locations by URI:

    /abs/dir, rel/dir, file:///abs/dir   -> LocalStore
    s3://bucket/prefix                   -> S3Store

Keys are '/'-separated paths relative to a store's root, never absolute and never with
'.' or '..' segments, so the same key means the same object in both stores and a key
cannot reach outside its store.

boto3 is imported only when an S3Store is built: the local path must work on machines
(and in tests) that do not have it.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import pickle
import re
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable
from urllib.parse import unquote

from infra.staged import TMP_SUFFIX, Staged, tmp_sibling, write_file

log = logging.getLogger(__name__)

MiB = 1024 * 1024

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/")
# S3's rules for bucket names, with the looser legacy ones (capitals, underscores) that old
# us-east-1 buckets may still carry: anything else no S3 request can name.
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]$")


class LocationError(ValueError):
    """A store's root where nothing can be written, whatever is retried."""


@runtime_checkable
class ObjectStore(Protocol):
    @property
    def uri(self) -> str:
        """The store's root, as a URI that `open_store` accepts."""
        ...

    def uri_for(self, key: str) -> str:
        """The full URI of `key`, for messages and for handing to another process."""
        ...

    def put_file(self, local_path: str | os.PathLike[str], key: str) -> None:
        """Upload a file; the object appears at `key` only once fully written."""
        ...

    def get_file(self, key: str, local_path: str | os.PathLike[str]) -> None:
        """Download to `local_path`, which appears only once fully written."""
        ...

    def put_bytes(self, key: str, data: bytes | bytearray | memoryview) -> None: ...

    def create_bytes(self, key: str, data: bytes | bytearray | memoryview) -> bool:
        """Write `key` only if nothing is there, as one atomic step (S3: a conditional PUT,
        If-None-Match: *). True if this call created it; False if it existed."""
        ...

    def get_bytes(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int: ...

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys (relative to the root) that start with `prefix` (a string prefix)."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; removing one that is not there is not an error."""
        ...

    def discard_partial(self, folder: str) -> int:
        """Remove what writers killed mid-write left in `folder` (a key prefix ending in a
        folder name); returns how many. Call it only when no writer of that folder is alive."""
        ...

    def local_path(self, key: str) -> str | None:
        """Where the object lives on this machine's filesystem, or None if remote."""
        ...

    def check_location(self) -> None:
        """Raise LocationError if objects can never be written here (a missing bucket, a
        root under a regular file): such a fault is the caller's input, not a passing one."""
        ...


# ---------------------------------------------------------------------------------------
# Keys


def check_key(key: str) -> str:
    """Return `key` if it is a safe relative key, else raise ValueError."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"object key must be a non-empty string, got {key!r}")
    if key.startswith("/") or "\x00" in key:
        raise ValueError(f"object key must be relative and free of NUL bytes: {key!r}")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(
                f"object key {key!r} has an empty, '.' or '..' segment; keys may not "
                "escape their store's root"
            )
    return key


def _check_prefix(prefix: str) -> str:
    # A list prefix may end mid-name ("seg" matches "segment-1"); only its whole
    # segments need to be safe.
    if prefix:
        head, _, _ = prefix.rpartition("/")
        if head:
            check_key(head)
        elif prefix.startswith("/"):
            check_key(prefix)
    return prefix


# ---------------------------------------------------------------------------------------
# Local filesystem


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class LocalStore:
    """Objects are files under `root`; the root is created on first write."""

    def __init__(self, root: str | os.PathLike[str]):
        # abspath, not realpath: a root reached through a symlink keeps working if the
        # link is repointed, and keys are checked lexically anyway.
        self.root = os.path.abspath(os.fspath(root))

    def __repr__(self) -> str:
        return f"LocalStore({self.root!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LocalStore) and other.root == self.root

    def __hash__(self) -> int:
        return hash(("LocalStore", self.root))

    @property
    def uri(self) -> str:
        return self.root

    def uri_for(self, key: str) -> str:
        return self._path(key)

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *check_key(key).split("/"))

    def _missing(self, key: str) -> FileNotFoundError:
        path = self._path(key)
        return FileNotFoundError(2, f"no object at {path}", path)

    def _file(self, key: str) -> str:
        path = self._path(key)
        if not os.path.isfile(path):
            raise self._missing(key)
        return path

    def put_file(self, local_path: str | os.PathLike[str], key: str) -> None:
        src, dst = os.fspath(local_path), self._path(key)
        if _same_file(src, dst):
            return
        if not os.path.isfile(src):
            raise FileNotFoundError(2, f"no file at {src}", src)

        def fill(f):
            with open(src, "rb") as s:
                shutil.copyfileobj(s, f, 4 * MiB)

        write_file(dst, fill)

    def get_file(self, key: str, local_path: str | os.PathLike[str]) -> None:
        src, dst = self._file(key), os.path.abspath(os.fspath(local_path))
        if _same_file(src, dst):
            return

        def fill(f):
            with open(src, "rb") as s:
                shutil.copyfileobj(s, f, 4 * MiB)

        write_file(dst, fill)

    def put_bytes(self, key: str, data: bytes | bytearray | memoryview) -> None:
        write_file(self._path(key), lambda f: f.write(data))

    def create_bytes(self, key: str, data: bytes | bytearray | memoryview) -> bool:
        # Written whole under a temporary name, then hard-linked to the key: link() fails if
        # the key exists, so the key appears complete, and only once.
        path = self._path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = tmp_sibling(path)
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            dir_fd = os.open(os.path.dirname(path), os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the new name survives a crash
            finally:
                os.close(dir_fd)
            return True
        finally:
            if os.path.lexists(tmp):
                os.remove(tmp)

    def get_bytes(self, key: str) -> bytes:
        try:
            with open(self._file(key), "rb") as f:
                return f.read()
        except (FileNotFoundError, IsADirectoryError):
            raise self._missing(key) from None

    def exists(self, key: str) -> bool:
        return os.path.isfile(self._path(key))

    def size(self, key: str) -> int:
        try:
            st = os.stat(self._path(key))
        except FileNotFoundError:
            raise self._missing(key) from None
        if not stat.S_ISREG(st.st_mode):
            raise self._missing(key)
        return st.st_size

    def list(self, prefix: str = "") -> list[str]:
        _check_prefix(prefix)
        # Walk only the directory the prefix's whole segments name, not the whole root.
        head = prefix.rpartition("/")[0]
        top = os.path.join(self.root, *head.split("/")) if head else self.root
        keys = []
        for dirpath, dirs, files in os.walk(top):
            # A folder being written (a PNG output before its rename) holds no keys yet.
            dirs[:] = [d for d in dirs if not d.endswith(TMP_SUFFIX)]
            rel = os.path.relpath(dirpath, self.root)
            base = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            for name in files:
                if name.endswith(TMP_SUFFIX):
                    continue
                key = base + name
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self._drop_empty_folders(os.path.dirname(path))

    def discard_partial(self, folder: str) -> int:
        top = os.path.join(self.root, *check_key(folder.strip("/")).split("/"))
        removed = 0
        for dirpath, dirs, files in os.walk(top):
            for name in [d for d in dirs if d.endswith(TMP_SUFFIX)]:
                shutil.rmtree(os.path.join(dirpath, name), ignore_errors=True)
                dirs.remove(name)
                removed += 1
            for name in files:
                if name.endswith(TMP_SUFFIX):
                    try:
                        os.unlink(os.path.join(dirpath, name))
                    except FileNotFoundError:
                        continue
                    removed += 1
        if removed:
            self._drop_empty_folders(top)
        return removed

    def _drop_empty_folders(self, folder: str) -> None:
        """Folders exist only to hold keys, as in S3: drop `folder` and its parents while empty."""
        while folder != self.root and folder.startswith(self.root + os.sep):
            try:
                os.rmdir(folder)
            except OSError:  # not empty (or already gone): stop here
                break
            folder = os.path.dirname(folder)

    def local_path(self, key: str) -> str | None:
        return self._path(key)

    def check_location(self) -> None:
        path = self.root
        while True:
            if os.path.lexists(path):
                if not os.path.isdir(path):
                    what = "is" if path == self.root else "lies under"
                    raise LocationError(f"{self.root} {what} a file ({path}), not a folder")
                return
            parent = os.path.dirname(path)
            if parent == path:
                return
            path = parent


# ---------------------------------------------------------------------------------------
# S3


@dataclass(frozen=True)
class S3Timeouts:
    """How long an S3 request may go unanswered, and how often it is tried.

    A stalled S3 (a dead connection, a stuck proxy) must become an error and a retry, with a
    line in the log, not a silent wait: a request that connects in no `connect_s` or gets no
    bytes back for `read_s` fails, and boto3's standard retry mode tries it again, backing off,
    up to `max_attempts` tries in all; each failed try logs a warning. `read_s` bounds a wait
    between two reads of one response, not a whole transfer: large objects go up and down in
    parts (64 MiB), and S3 itself keeps a long CompleteMultipartUpload alive.

    Workers build their stores from the environment (FRAMEFARM_S3_CONNECT_TIMEOUT_S,
    FRAMEFARM_S3_READ_TIMEOUT_S, FRAMEFARM_S3_MAX_ATTEMPTS, else AWS_MAX_ATTEMPTS), which Ray
    hands on from the driver's machine to the processes it starts there.
    """

    connect_s: float = 10.0
    read_s: float = 30.0
    max_attempts: int = 10

    def __post_init__(self):
        if not (self.connect_s > 0 and self.read_s > 0 and self.max_attempts >= 1):
            raise ValueError(f"S3 timeouts must be > 0 and attempts >= 1: {self}")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> S3Timeouts:
        default = cls()
        try:
            return cls(connect_s=float(env.get("FRAMEFARM_S3_CONNECT_TIMEOUT_S", default.connect_s)),
                       read_s=float(env.get("FRAMEFARM_S3_READ_TIMEOUT_S", default.read_s)),
                       max_attempts=int(env.get("FRAMEFARM_S3_MAX_ATTEMPTS",
                                                env.get("AWS_MAX_ATTEMPTS", default.max_attempts))))
        except ValueError as exc:
            raise ValueError(f"bad FRAMEFARM_S3_* setting in the environment: {exc}") from None


class _RetryLog:
    """A botocore `needs-retry` hook that says, once per failed try, what failed and where.

    It only watches: whether to retry stays the standard retry handler's decision, made
    beside it for the same try (connection errors, timeouts, 5xx and throttling are retried
    until `max_attempts`)."""

    _TRANSIENT = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                  "InternalError", "ServiceUnavailable"}

    def __init__(self, uri: str, max_attempts: int):
        self.uri, self.max_attempts = uri, max_attempts

    def __call__(self, attempts: int, caught_exception: BaseException | None = None, response=None,
                 operation=None, request_dict=None, **_) -> None:
        if caught_exception is not None:
            why = f"{type(caught_exception).__name__}: {caught_exception}"
        else:
            parsed = response[1] if isinstance(response, tuple) and len(response) > 1 else {}
            status = parsed.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            code = parsed.get("Error", {}).get("Code")
            if not (status >= 500 or code in self._TRANSIENT):
                return None
            why = f"HTTP {status} {code or ''}".rstrip()
        what = getattr(operation, "name", "request")
        url = (request_dict or {}).get("url", self.uri)
        if attempts < self.max_attempts:
            log.warning("S3 %s %s failed (%s), try %d of %d; retrying", what, url, why, attempts, self.max_attempts)
        else:
            log.warning("S3 %s %s failed (%s), try %d of %d; giving up", what, url, why, attempts,
                        self.max_attempts)
        return None


def _portable(exc: BaseException) -> BaseException:
    """`exc`, or the same error in a form that pickles. botocore's connection errors keep the
    request they failed on, whose body is an open file: raised in a Ray worker, Ray cannot send
    them to the driver and puts its own multi-line RayError in their place (which the driver
    can neither retry nor report in one line)."""
    try:
        pickle.dumps(exc)
        return exc
    except Exception:  # noqa: BLE001 - anything that stops it pickling
        pass
    kwargs = {k: v if _pickles(v) else repr(v) for k, v in (getattr(exc, "kwargs", None) or {}).items()
              if k != "request"}
    try:
        portable = type(exc)(**kwargs)
        pickle.dumps(portable)
    except Exception:  # noqa: BLE001 - not a botocore-style error: keep its words
        portable = ConnectionError(f"{type(exc).__name__}: {exc}")
    return portable.with_traceback(exc.__traceback__)


def _pickles(value: Any) -> bool:
    try:
        pickle.dumps(value)
        return True
    except Exception:  # noqa: BLE001
        return False


def _portable_errors(method):
    """Errors of an S3Store method leave it in a form that pickles (see `_portable`)."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except Exception as exc:
            portable = _portable(exc)
            if portable is exc:
                raise
            raise portable from None

    return wrapper


_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
_FORBIDDEN_CODES = {"403", "AccessDenied", "Forbidden"}


def _error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code"))
    return None


class S3Store:
    """Objects under `s3://bucket/prefix/`.

    Credentials come from boto3's standard chain (env, shared config, instance role);
    the endpoint from `endpoint_url` if given, else AWS_ENDPOINT_URL_S3 /
    AWS_ENDPOINT_URL, which boto3 reads itself; timeouts and retries from `timeouts`, else
    the environment (`S3Timeouts`). Pickles without its client (Ray ships stores to
    workers) and rebuilds one on arrival from the same settings, so a store built with an
    explicit `client=` comes back with a default-chain client.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        client: Any = None,
        multipart_threshold: int = 64 * MiB,
        multipart_chunksize: int = 64 * MiB,
        max_concurrency: int = 8,
        timeouts: S3Timeouts | None = None,
    ):
        if not _BUCKET.match(bucket or "") or ".." in bucket:
            raise LocationError(f"bad S3 bucket name {bucket!r}: 3-63 letters, digits, dots and hyphens")
        prefix = prefix.strip("/")
        if prefix:
            check_key(prefix)
        self.bucket = bucket
        self.prefix = prefix
        self._endpoint_url = endpoint_url
        self.timeouts = timeouts or S3Timeouts.from_env(os.environ)
        self._transfer_settings = dict(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
        )
        self._client = client if client is not None else self._make_client()
        self._transfer = self._make_transfer_config()

    def _make_client(self) -> Any:
        try:
            import boto3
            from botocore.config import Config
        except ImportError as e:
            raise ImportError(
                "s3:// storage needs boto3 (pip install boto3); local paths do not"
            ) from e
        # A session of our own: boto3's default session is process-global and not
        # thread-safe to create clients from.
        session = boto3.session.Session()
        t = self.timeouts
        kwargs: dict[str, Any] = {
            "config": Config(connect_timeout=t.connect_s, read_timeout=t.read_s,
                             retries={"mode": "standard", "total_max_attempts": t.max_attempts})
        }
        # Only an explicit argument is passed: without one, boto3 applies
        # AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / config-file endpoints itself.
        if self._endpoint_url:
            kwargs["endpoint_url"] = self._endpoint_url
        client = session.client("s3", **kwargs)
        client.meta.events.register("needs-retry.s3", _RetryLog(self.uri, t.max_attempts))
        return client

    def _make_transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        # "classic" pins the s3transfer path: the CRT client, if installed, would
        # choose its own part sizes and ignore these settings.
        return TransferConfig(
            **self._transfer_settings, use_threads=True, preferred_transfer_client="classic"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None
        state["_transfer"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._client = self._make_client()
        self._transfer = self._make_transfer_config()

    def __repr__(self) -> str:
        return f"S3Store(bucket={self.bucket!r}, prefix={self.prefix!r})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, S3Store)
            and (other.bucket, other.prefix) == (self.bucket, self.prefix)
            and other._endpoint_url == self._endpoint_url
        )

    def __hash__(self) -> int:
        return hash(("S3Store", self.bucket, self.prefix))

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def uri_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _missing(self, key: str) -> FileNotFoundError:
        uri = self.uri_for(key)
        return FileNotFoundError(2, f"no object at {uri}", uri)

    @_portable_errors
    def put_file(self, local_path: str | os.PathLike[str], key: str) -> None:
        src = os.fspath(local_path)
        if not os.path.isfile(src):
            raise FileNotFoundError(2, f"no file at {src}", src)
        # Above the threshold this is a multipart upload: S3 creates the object only at
        # CompleteMultipartUpload, and s3transfer aborts the upload on failure.
        self._client.upload_file(src, self.bucket, self._key(key), Config=self._transfer)
        log.debug("uploaded %s to %s", src, self.uri_for(key))

    @_portable_errors
    def get_file(self, key: str, local_path: str | os.PathLike[str]) -> None:
        staged = Staged(local_path)
        try:
            self._client.download_file(self.bucket, self._key(key), staged.tmp, Config=self._transfer)
            staged.commit()
        except BaseException as e:
            staged.discard()
            err = self._missing_or(key, e)
            if err is not e:
                raise err from e
            raise

    @_portable_errors
    def put_bytes(self, key: str, data: bytes | bytearray | memoryview) -> None:
        self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=bytes(data))

    @_portable_errors
    def create_bytes(self, key: str, data: bytes | bytearray | memoryview) -> bool:
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=bytes(data), IfNoneMatch="*")
        except Exception as e:
            # 412: the key exists. 409: another conditional write to it is in flight, which
            # will win or has won.
            if _error_code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return False
            raise
        return True

    @_portable_errors
    def get_bytes(self, key: str) -> bytes:
        # download_fileobj rather than get_object: s3transfer retries a body stream
        # that breaks mid-read and fetches large objects in parallel ranges.
        buf = io.BytesIO()
        try:
            self._client.download_fileobj(
                self.bucket, self._key(key), buf, Config=self._transfer
            )
        except Exception as e:
            err = self._missing_or(key, e)
            if err is not e:
                raise err from e
            raise
        return buf.getvalue()

    def _missing_or(self, key: str, exc: BaseException) -> BaseException:
        """The error to raise for a failed read of `key`: FileNotFoundError when the key is
        absent. Under a least-privilege policy S3 answers a read of a missing key with 403
        (see `_stat`), so a 403 is told apart by listing."""
        code = _error_code(exc)
        if code in _NOT_FOUND_CODES:
            return self._missing(key)
        if code in _FORBIDDEN_CODES:
            try:
                if self._stat(key) is None:
                    return self._missing(key)
            except Exception:  # noqa: BLE001 - listing is forbidden too: the 403 is the answer
                pass
        return exc

    def _stat(self, key: str) -> dict[str, Any] | None:
        """The listing entry of `key`, or None.

        A one-key LIST rather than HEAD: under a least-privilege policy whose ListBucket is
        limited to the job's prefix (infra/iam_policy.json), S3 answers HEAD of a missing
        key with 403, not 404, so HEAD cannot tell "absent" from "forbidden".
        """
        full = self._key(key)
        try:
            page = self._client.list_objects_v2(Bucket=self.bucket, Prefix=full, MaxKeys=1)
        except Exception as e:
            if _error_code(e) in _NOT_FOUND_CODES:
                return None
            raise
        contents = page.get("Contents") or []
        # Keys sort lexicographically, so the key itself, if present, comes first.
        return contents[0] if contents and contents[0]["Key"] == full else None

    @_portable_errors
    def exists(self, key: str) -> bool:
        return self._stat(key) is not None

    @_portable_errors
    def size(self, key: str) -> int:
        stat = self._stat(key)
        if stat is None:
            raise self._missing(key)
        return int(stat["Size"])

    @_portable_errors
    def list(self, prefix: str = "") -> list[str]:
        _check_prefix(prefix)
        root = f"{self.prefix}/" if self.prefix else ""
        keys = []
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=root + prefix):
            for obj in page.get("Contents", ()):
                key = obj["Key"][len(root) :]
                # Console-made "folder" markers are not objects anyone wrote.
                if key and not key.endswith("/"):
                    keys.append(key)
        return sorted(keys)

    @_portable_errors
    def delete(self, key: str) -> None:
        self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def discard_partial(self, folder: str) -> int:
        # Nothing to do: an S3 object exists only once its upload completes. Parts of a
        # multipart upload cut short are not objects; the bucket's lifecycle rule aborts them.
        check_key(folder.strip("/"))
        return 0

    def local_path(self, key: str) -> str | None:
        check_key(key)
        return None

    @_portable_errors
    def abort_uploads(self) -> list[str]:
        """Abort unfinished multipart uploads under this store's prefix (a process killed
        mid-upload leaves one: invisible, but stored and billed); returns their keys."""
        root = f"{self.prefix}/" if self.prefix else ""
        aborted = []
        try:
            paginator = self._client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=root):
                for upload in page.get("Uploads", ()):
                    self._client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"],
                                                        UploadId=upload["UploadId"])
                    aborted.append(f"s3://{self.bucket}/{upload['Key']}")
        except Exception as e:
            if _error_code(e) not in _FORBIDDEN_CODES:
                raise
            log.warning("cannot list unfinished uploads under %s (%s): the bucket's lifecycle rule "
                        "must abort them", self.uri, _error_code(e))
        return aborted

    @_portable_errors
    def check_location(self) -> None:
        # A one-key listing of the prefix: allowed under the job's least-privilege policy,
        # where HeadBucket may not be.
        try:
            self._client.list_objects_v2(Bucket=self.bucket, Prefix=f"{self.prefix}/" if self.prefix else "",
                                         MaxKeys=1)
        except Exception as e:
            code = _error_code(e)
            if code in ("NoSuchBucket", "InvalidBucketName"):
                raise LocationError(f"{self.uri}: bucket {self.bucket!r} does not exist "
                                    f"({code}); create it or fix the URI") from None
            raise


# ---------------------------------------------------------------------------------------
# URIs


def is_s3(uri: str | os.PathLike[str]) -> bool:
    return isinstance(uri, str) and uri[:5].lower() == "s3://"


def split_uri(uri: str | os.PathLike[str]) -> tuple[str, str, str]:
    """('s3', bucket, key_or_prefix) or ('file', '', absolute_path).

    Plain paths and file:// URIs are local. Anything that looks like another scheme
    ('gs://', 'http://', or a mistyped 's3:/') is a ValueError rather than a relative
    path nobody meant.
    """
    if not isinstance(uri, str):
        return "file", "", os.path.abspath(os.fspath(uri))
    m = _SCHEME.match(uri)
    if m is None:
        if not uri:
            raise ValueError("empty storage URI")
        return "file", "", os.path.abspath(uri)
    scheme = m.group(1).lower()
    rest = uri[m.end() :]
    if not rest.startswith("/"):
        raise ValueError(f"malformed URI {uri!r}: expected {scheme}://...")
    rest = rest[1:]
    if scheme == "file":
        host, slash, path = rest.partition("/")
        if host not in ("", "localhost") or not slash:
            raise ValueError(f"file URI {uri!r} must name a local absolute path (file:///...)")
        return "file", "", os.path.abspath("/" + unquote(path))
    if scheme == "s3":
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise ValueError(f"S3 URI {uri!r} has no bucket")
        return "s3", bucket, key.strip("/")
    raise ValueError(
        f"unsupported storage URI {uri!r}: use a local path, file:///path or "
        "s3://bucket/prefix (other S3-compatible stores: s3:// with AWS_ENDPOINT_URL_S3)"
    )


def open_store(uri: str | os.PathLike[str]) -> ObjectStore:
    scheme, bucket, path = split_uri(uri)
    if scheme == "s3":
        return S3Store(bucket, path)
    return LocalStore(path)


def _open_object(uri: str | os.PathLike[str]) -> tuple[ObjectStore, str]:
    scheme, bucket, path = split_uri(uri)
    if scheme == "s3":
        if not path:
            raise ValueError(f"S3 URI {uri!r} names a bucket, not an object")
        return S3Store(bucket), path
    parent, name = os.path.split(path)
    return LocalStore(parent), name


def read_uri_bytes(uri: str | os.PathLike[str]) -> bytes:
    """The whole object at a full URI (s3://bucket/key or a path)."""
    store, key = _open_object(uri)
    return store.get_bytes(key)


def download_prefix(uri: str | os.PathLike[str], local_dir: str | os.PathLike[str]) -> list[str]:
    """Copy every object under a folder or S3 prefix into `local_dir`, keeping relative
    paths. Returns the local paths written. An empty source is a FileNotFoundError: a
    model folder that holds nothing is a wrong URI, not an empty model.
    """
    store = open_store(uri)
    keys = store.list()
    if not keys:
        raise FileNotFoundError(2, f"no objects under {store.uri}", store.uri)
    dest = LocalStore(local_dir)
    written = []
    for key in keys:
        path = dest.local_path(key)
        assert path is not None
        store.get_file(key, path)
        written.append(path)
    return written


__all__ = [
    "LocationError",
    "ObjectStore",
    "LocalStore",
    "S3Store",
    "S3Timeouts",
    "open_store",
    "split_uri",
    "is_s3",
    "check_key",
    "read_uri_bytes",
    "download_prefix",
]


# ---------------------------------------------------------------------------------------
# Access, checked before any work


class AccessError(ValueError):
    """A URI this machine cannot use: no credentials for S3, or a folder it may not write."""


CREDENTIALS_HINT = ("give credentials with AWS_PROFILE=NAME (a profile in ~/.aws/config), "
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or an instance role (EC2 instance "
                    "profile; on a Ray cluster, the head's and the workers' roles)")


def check_access(uri: str | os.PathLike[str], *, write: bool = False) -> None:
    """Refuse, before any work, a URI that would fail only once workers use it.

    S3: boto3's credential chain must find credentials (env, profile, SSO, instance role);
    whether the bucket exists and allows this is another question, answered by S3 itself.
    Local, for writing: the nearest folder that exists on the way to `uri` must be writable,
    so that the output (or its missing parents) can be created there.
    """
    scheme, _, path = split_uri(uri)
    if scheme == "s3":
        import boto3

        if boto3.session.Session().get_credentials() is None:
            raise AccessError(f"{uri}: no AWS credentials found on this machine; {CREDENTIALS_HINT}")
        return
    if not write:
        return
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if os.path.isdir(existing) and not os.access(existing, os.W_OK | os.X_OK, effective_ids=True):
        what = "output folder" if existing == path else f"folder {existing}, where the output would be made,"
        raise AccessError(f"{uri}: the {what} is not writable by this user (uid {os.geteuid()}); "
                          "choose another output or change the folder's permissions")

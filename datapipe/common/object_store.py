"""Folders in object storage (s3://, gs://, hf://) through fsspec: read, download, upload and list objects,
retrying broken connections with backoff, and errors that name the location and say what to fix. What a later
try cannot fix is not retried (a host name that does not resolve, refused credentials): a gs:// location's host
is resolved before gcsfs looks for credentials, and gcsfs's own retries are off, as s3fs's are.

Credentials and endpoints come from each back-end's usual places (s3fs: AWS_ACCESS_KEY_ID,
AWS_PROFILE, AWS_ENDPOINT_URL, ~/.aws; gcsfs: GOOGLE_APPLICATION_CREDENTIALS, gcloud's login;
huggingface_hub: HF_TOKEN, `hf auth login`); nothing here stores or passes them.
"""

import hashlib
import logging
import socket
import time
import types
from urllib.parse import urlsplit

import fsspec

log = logging.getLogger("datapipe")
REMOTE_SCHEMES = ("s3", "gs", "gcs", "hf")
CHUNK_BYTES = 8 << 20
# Exception class names (anywhere in the class's ancestry) of a connection that broke or never opened.
TRANSIENT_NAMES = ("Connection", "Timeout", "ServerDisconnected", "ClientPayloadError", "IncompleteRead",
                   "ReadError", "ProtocolError")
RETRIED_HTTP_CODES = {408, 429, 500, 502, 503, 504}  # HTTP statuses (gcsfs's HttpError.code) a later try may not meet
BACKEND_OPTIONS = {"s3": {"config_kwargs": {"retries": {"max_attempts": 1}}}}
CREDENTIAL_FIX = {"s3": "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE (and AWS_ENDPOINT_URL for a "
                        "non-AWS server)",
                  "gs": "set GOOGLE_APPLICATION_CREDENTIALS or run `gcloud auth application-default login`",
                  "hf": "set HF_TOKEN or run `hf auth login`"}


class StorageError(RuntimeError):
    """An object-storage failure a user must fix (credentials, bucket, missing object, network gone)."""


class MissingObject(StorageError):
    """The object (or folder) is not there; its bucket is."""


class ObjectChanged(StorageError):
    """The object was replaced while it was read (s3fs's FileExpired): its bytes are of two versions."""


class LocalWriteError(OSError):
    """Writing the local copy of an object failed (a full disk): a failure here, not of the object storage."""


class _RequestGivenUp(logging.Filter):
    """Drops gcsfs's log records (with tracebacks) of a request it gives up on: RemoteFolder reports it in one line."""

    def filter(self, record):
        return record.funcName != "retry_request"


QUIET_GCSFS_RETRIES = _RequestGivenUp()


def is_remote(location):
    """Whether `location` is an object-storage URL this package reads (s3://, gs://, gcs://, hf://)."""
    text = str(location)
    return "://" in text and text.split("://", 1)[0] in REMOTE_SCHEMES


def _causes(error, deepest=20):
    """`error` and the exceptions it was raised from or during (`deepest` of them at most: a chain may loop)."""
    for _ in range(deepest):
        if error is None:
            return
        yield error
        error = error.__cause__ or error.__context__


def _is_unresolvable(error):
    """Whether a host name did not resolve (no network, or no DNS): retrying in a few seconds does not help."""
    return any(isinstance(cause, socket.gaierror) or "DNS" in type(cause).__name__ for cause in _causes(error))


def _is_transient(error):
    if _is_unresolvable(error):
        return False
    if str(getattr(error, "code", "")) in {str(code) for code in RETRIED_HTTP_CODES}:
        return True
    return any(name in cls.__name__ for cls in type(error).__mro__ for name in TRANSIENT_NAMES)


def _gcs_host():
    """The host gcsfs sends requests to (storage.googleapis.com, or STORAGE_EMULATOR_HOST's)."""
    from gcsfs.core import _location

    return urlsplit(_location()).hostname


def _one_gcsfs_try(fs):
    """gcsfs tries a failed request 6 times over about 30 s, unresolvable hosts and refused credentials included;
    RemoteFolder._call retries what a later try can fix."""
    from gcsfs.retry import retry_request

    request = getattr(type(fs)._request, "__wrapped__", None)
    if request is not None:
        fs._request = types.MethodType(retry_request(retries=1)(request), fs)
    logging.getLogger("gcsfs").addFilter(QUIET_GCSFS_RETRIES)


class RemoteFolder:
    """One folder (prefix) of a bucket or repository; object names are relative to it."""

    def __init__(self, location, retries=4, first_wait_s=1.0):
        """`retries`: further tries after a broken connection, waiting first_wait_s, then twice that, ..."""
        self.location = str(location).rstrip("/")
        self.scheme = self.location.split("://", 1)[0]
        self.retries, self.first_wait_s = retries, first_wait_s
        try:
            if self.scheme in ("gs", "gcs"):
                self._check_host_resolves(_gcs_host())  # before gcsfs looks for credentials (15 s without a network)
            # A new filesystem object reads the credentials now; the back-end's own retries are off (ours back off).
            self.fs, self.root = fsspec.core.url_to_fs(self.location, skip_instance_cache=True,
                                                       **BACKEND_OPTIONS.get(self.scheme, {}))
        except ImportError as error:
            package = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "hf": "huggingface_hub"}[self.scheme]
            raise StorageError(f"{self.location}: reading {self.scheme}:// needs {package} ({error}); "
                               f"pip install {package}") from None
        self._backend_tries_once()

    def __setstate__(self, state):  # a filesystem unpickled in a DataLoader worker is made anew, with its defaults
        self.__dict__.update(state)
        self._backend_tries_once()

    def _backend_tries_once(self):
        if self.scheme == "s3":
            self.fs.retries = 1  # s3fs's own loop (a class attribute, 5 tries) tries once
        elif self.scheme in ("gs", "gcs"):
            _one_gcsfs_try(self.fs)

    def _check_host_resolves(self, host):
        try:
            socket.getaddrinfo(host, None)
        except OSError as error:
            raise StorageError(f"{self.location}: cannot resolve {host} ({error.strerror or error}): this machine has "
                               f"no network or no DNS; connect it (or check the host's name), then run the same "
                               f"command again") from None

    def url(self, name):
        return f"{self.location}/{name}"

    def _call(self, what, name, action):
        """action() with retries of broken connections; other failures become one-line StorageErrors."""
        for attempt in range(self.retries + 1):
            try:
                return action()
            except LocalWriteError:
                raise
            except Exception as error:  # noqa: BLE001 (each back-end raises its own types; sorted below)
                if not _is_transient(error) or attempt == self.retries:
                    raise self._explained(what, name, error, attempt) from None
                wait_s = self.first_wait_s * 2 ** attempt
                log.warning("%s %s: %s: %s; try %d of %d in %.1f s", what, self.url(name), type(error).__name__,
                            error, attempt + 2, self.retries + 1, wait_s)
                time.sleep(wait_s)
        raise AssertionError("unreachable")

    def _explained(self, what, name, error, attempt):
        url, text = self.url(name), f"{type(error).__name__}: {error}".splitlines()[0]
        fix = CREDENTIAL_FIX.get("gs" if self.scheme == "gcs" else self.scheme, "check the credentials")
        lowered = text.lower()
        if "FileExpired" in text:
            return ObjectChanged(f"{what} {url}: the object was replaced while it was read ({text})")
        if _is_unresolvable(error):
            return StorageError(f"{what} {url}: the server's name does not resolve ({text}); check the network (and "
                                f"DNS), then run the same command again (training resumes from its last checkpoint)")
        if "RefreshError" in text or str(getattr(error, "code", "")) == "401" or "anonymous caller" in lowered:
            return StorageError(f"{what} {url}: the credentials were refused or are missing ({text}); {fix}")
        if "credential" in lowered and ("unable to locate" in lowered or "no credentials" in lowered):
            return StorageError(f"{what} {url}: no credentials found ({text}); {fix}")
        if isinstance(error, PermissionError) or "accessdenied" in lowered.replace(" ", "") \
                or "forbidden" in lowered or "invalidaccesskeyid" in lowered or "signature" in lowered:
            return StorageError(f"{what} {url}: access denied ({text}); {fix}, with read access to "
                                f"{self.location}")
        if isinstance(error, FileNotFoundError) or "nosuch" in lowered or "not found" in lowered:
            if "bucket" in lowered:
                return StorageError(f"{what} {url}: no such bucket ({text}); check the bucket's name in "
                                    f"{self.location} (and AWS_ENDPOINT_URL/the region for s3)")
            return MissingObject(f"{what} {url}: no such object ({text}); check the location, or publish the "
                                f"shards there with `make shards OUT={self.location.rsplit('/', 1)[0]}`")
        if _is_transient(error):
            return StorageError(f"{what} {url}: the connection failed {attempt + 1} times ({text}); check the "
                                f"network and the endpoint, then run the same command again (training resumes "
                                f"from its last checkpoint)")
        return StorageError(f"{what} {url}: {text}")

    def read_bytes(self, name):
        return self._call("reading", name, lambda: self.fs.cat_file(f"{self.root}/{name}"))

    def sizes(self, missing_ok=False):
        """{object name: bytes} of the objects directly in the folder; {} for a folder not made yet if
        `missing_ok` (its bucket must exist)."""
        def listing():
            return {entry["name"].rsplit("/", 1)[-1]: entry["size"]
                    for entry in self.fs.ls(self.root, detail=True, refresh=True) if entry["type"] == "file"}
        try:
            return self._call("listing", "", listing)
        except MissingObject:
            if missing_ok:
                return {}
            raise

    def download(self, name, local_path):
        """Copy the object to `local_path` (overwritten); returns its sha256 hex digest. Raises ObjectChanged when
        the object is replaced while read (the next download reads the new one), LocalWriteError when writing
        `local_path` fails."""
        def copy():
            digest = hashlib.sha256()
            with self.fs.open(f"{self.root}/{name}", "rb", block_size=CHUNK_BYTES) as source, \
                    _open_local(local_path) as sink:
                while chunk := source.read(CHUNK_BYTES):
                    digest.update(chunk)
                    _write_all(sink, chunk, local_path)
            return digest.hexdigest()
        try:
            return self._call("downloading", name, copy)
        except ObjectChanged:
            self.fs.invalidate_cache(f"{self.root}/{name}")  # the listing's version of it is gone
            raise

    def upload(self, local_path, name):
        self._call("uploading", name, lambda: self.fs.put_file(str(local_path), f"{self.root}/{name}"))

    def remove(self, name):
        self._call("removing", name, lambda: self.fs.rm_file(f"{self.root}/{name}"))


def _open_local(path):
    try:
        return open(path, "wb", buffering=0)  # unbuffered: every failed write surfaces in _write_all
    except OSError as error:
        raise LocalWriteError(error.errno, error.strerror, str(path)) from None


def _write_all(sink, data, path):
    view = memoryview(data)
    try:
        while view:
            view = view[sink.write(view):]
    except OSError as error:
        raise LocalWriteError(error.errno, error.strerror, str(path)) from None

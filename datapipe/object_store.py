"""Folders in object storage (s3://, gs://, hf://) through fsspec: read, download, upload and list objects,
retrying broken connections with backoff, and errors that name the location and say what to fix.

Credentials and endpoints come from each back-end's usual places (s3fs: AWS_ACCESS_KEY_ID,
AWS_PROFILE, AWS_ENDPOINT_URL, ~/.aws; gcsfs: GOOGLE_APPLICATION_CREDENTIALS, gcloud's login;
huggingface_hub: HF_TOKEN, `hf auth login`); nothing here stores or passes them.
"""

import hashlib
import logging
import time

import fsspec

log = logging.getLogger("datapipe")
REMOTE_SCHEMES = ("s3", "gs", "gcs", "hf")
CHUNK_BYTES = 8 << 20
# Exception class names (anywhere in the class's ancestry) of a connection that broke or never opened.
TRANSIENT_NAMES = ("Connection", "Timeout", "ServerDisconnected", "ClientPayloadError", "IncompleteRead",
                   "ReadError", "ProtocolError")
BACKEND_OPTIONS = {"s3": {"config_kwargs": {"retries": {"max_attempts": 1}}}}
CREDENTIAL_FIX = {"s3": "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE (and AWS_ENDPOINT_URL for a "
                        "non-AWS server)",
                  "gs": "set GOOGLE_APPLICATION_CREDENTIALS or run `gcloud auth application-default login`",
                  "hf": "set HF_TOKEN or run `hf auth login`"}


class StorageError(RuntimeError):
    """An object-storage failure a user must fix (credentials, bucket, missing object, network gone)."""


class MissingObject(StorageError):
    """The object (or folder) is not there; its bucket is."""


def is_remote(location):
    """Whether `location` is an object-storage URL this package reads (s3://, gs://, gcs://, hf://)."""
    text = str(location)
    return "://" in text and text.split("://", 1)[0] in REMOTE_SCHEMES


def _is_transient(error):
    return any(name in cls.__name__ for cls in type(error).__mro__ for name in TRANSIENT_NAMES)


class RemoteFolder:
    """One folder (prefix) of a bucket or repository; object names are relative to it."""

    def __init__(self, location, retries=4, first_wait_s=1.0):
        """`retries`: further tries after a broken connection, waiting first_wait_s, then twice that, ..."""
        self.location = str(location).rstrip("/")
        self.scheme = self.location.split("://", 1)[0]
        self.retries, self.first_wait_s = retries, first_wait_s
        try:
            # A new filesystem object reads the credentials now; the back-end's own retries are off (ours back off).
            self.fs, self.root = fsspec.core.url_to_fs(self.location, skip_instance_cache=True,
                                                       **BACKEND_OPTIONS.get(self.scheme, {}))
            if self.scheme == "s3":
                self.fs.retries = 1  # s3fs's own loop (a class attribute, 5 tries) tries once
        except ImportError as error:
            package = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "hf": "huggingface_hub"}[self.scheme]
            raise StorageError(f"{self.location}: reading {self.scheme}:// needs {package} ({error}); "
                               f"pip install {package}") from None

    def url(self, name):
        return f"{self.location}/{name}"

    def _call(self, what, name, action):
        """action() with retries of broken connections; other failures become one-line StorageErrors."""
        for attempt in range(self.retries + 1):
            try:
                return action()
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
        """Copy the object to `local_path` (overwritten); returns its sha256 hex digest."""
        def copy():
            digest = hashlib.sha256()
            with self.fs.open(f"{self.root}/{name}", "rb", block_size=CHUNK_BYTES) as source, \
                    open(local_path, "wb") as sink:
                while chunk := source.read(CHUNK_BYTES):
                    digest.update(chunk)
                    sink.write(chunk)
            return digest.hexdigest()
        return self._call("downloading", name, copy)

    def upload(self, local_path, name):
        self._call("uploading", name, lambda: self.fs.put_file(str(local_path), f"{self.root}/{name}"))

    def remove(self, name):
        self._call("removing", name, lambda: self.fs.rm_file(f"{self.root}/{name}"))

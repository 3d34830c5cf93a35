"""Inputs from object storage: any URL fsspec understands (`s3://`, `gs://`, `az://`, ...) is fetched once into a
local cache and read from there.

The cache (`$WMTP_CACHE`, default `~/.cache/wmtp`) holds one directory per URL. A file or every file under a
directory is downloaded in parallel, each to a temporary name and renamed when its size (and its MD5, when the
store's ETag is one) checks out; a manifest of sizes and ETags is written last. A second fetch of an unchanged
URL downloads nothing; an interrupted fetch resumes with the files it already has. Credentials come from the
storage library's standard chain (environment, profile, instance role); an endpoint such as a local MinIO is
set the fsspec way, e.g. `FSSPEC_S3_ENDPOINT_URL`. Nothing here prints or stores a credential.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..config import ConfigError

MANIFEST = ".wmtp-manifest.json"
WORKERS = 8


class StorageError(RuntimeError):
    """A transfer to or from object storage that failed after its retries (a run stops with it)."""


def is_remote(spec: str | os.PathLike) -> bool:
    """A URL with a scheme other than file:// (hub ids, paths and `pkg:` specs are not)."""
    text = str(spec)
    return "://" in text and not text.startswith("file://")


def cache_root() -> Path:
    return Path(os.environ.get("WMTP_CACHE") or Path.home() / ".cache" / "wmtp")


def local_path(spec: str | os.PathLike, what: str = "path") -> str:
    """`spec` itself when it is local (a `file://` prefix removed); a remote URL fetched into the cache."""
    text = str(spec)
    if text.startswith("file://"):
        return text[len("file://"):]
    return str(fetch(text, what)) if is_remote(text) else text


# Errors that mean the store was never reached, by the name of the class: botocore's (s3fs) and aiohttp's
# (gcsfs, adlfs), which wmtp does not import; their causes, when kept, are the builtin errors checked first.
_UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                "ClientConnectorError", "ServerDisconnectedError", "ServerTimeoutError", "FSTimeoutError"}
# The store's codes for credentials it does not accept (the key, the signature, an expired session token).
_REFUSED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired",
            "InvalidClientTokenId", "AuthorizationHeaderMalformed"}


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the errors it was raised from (libraries wrap: s3fs's PermissionError around botocore's error)."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(".") if text else ""


def _unreachable(chain: list[BaseException]) -> str | None:
    """Why the store could not be reached (connection refused, timed out, host name not found), or None when it
    answered."""
    for e in chain:
        if isinstance(e, socket.gaierror):
            return "host name not found"
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, TimeoutError) or "Timeout" in type(e).__name__:
            return "timed out"
    for e in chain:
        if isinstance(e, ConnectionError) or type(e).__name__ in _UNREACHABLE:
            return _first_line(e) or type(e).__name__
    return None


def _error_code(chain: list[BaseException]) -> str | None:
    """The store's error code (`NoSuchBucket`, `InvalidAccessKeyId`, ...) from a botocore-style response."""
    for e in chain:
        response = getattr(e, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code"):
            return str(response["Error"]["Code"])
    return None


def endpoint_of(fs) -> str | None:
    """The endpoint URL an fsspec filesystem talks to, when it has one set (s3fs's `endpoint_url`)."""
    return getattr(fs, "endpoint_url", None) or (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url")


def explain(exc: BaseException, endpoint: str | None = None) -> str:
    """A storage error in one line that says whose fault it is: an endpoint that could not be reached, credentials
    the store refused or could not find, a missing object, a refused access (never a credential: the libraries do
    not put them in their messages). `endpoint` names the store in the line."""
    chain = _chain(exc)
    store = f"the store at {endpoint}" if endpoint else "the store"
    if (reason := _unreachable(chain)) is not None:
        return f"cannot reach {store} ({reason}); check the endpoint URL and the network"
    if (code := _error_code(chain)) in _REFUSED:
        return f"{store} refused these credentials ({code}: {_first_line(exc)}); check the storage credentials"
    if any(type(e).__name__ == "NoCredentialsError" for e in chain):
        return "no storage credentials found; set them in the environment, a profile or an instance role"
    first = _first_line(exc)
    if isinstance(exc, FileNotFoundError):
        return f"not found ({first})"
    if isinstance(exc, PermissionError):
        return f"access denied; check the storage credentials ({first})"
    return f"{type(exc).__name__}: {first}"


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(url: str, what: str = "path") -> Path:
    """The local copy of `url` (a file or a directory tree), downloaded unless the cache already holds this
    version. `what` names the config key in errors."""
    import fsspec

    fs = None
    try:
        fs, root = fsspec.core.url_to_fs(url)
        fs.invalidate_cache(root)  # listings are cached per filesystem: ask the store for the current version
        info = fs.info(root)
        if info["type"] == "directory":
            found = fs.find(root, detail=True)
            files = {name[len(root.rstrip("/")) + 1:]: meta for name, meta in found.items()}
        else:
            files = {Path(root).name: info}
    except Exception as exc:  # the storage library's own errors (no credentials, bad endpoint): one line, the URL
        raise ConfigError(f"{what} {url}: {explain(exc, endpoint_of(fs))}") from None
    if not files:
        raise ConfigError(f"{what} {url}: an empty directory")
    target = cache_root() / hashlib.sha256(url.encode()).hexdigest()[:24]
    local = target / (Path(root.rstrip("/")).name or "root")
    expected = {rel: {"size": int(meta.get("size") or 0), "etag": str(meta.get("ETag") or meta.get("etag") or "")}
                for rel, meta in files.items()}
    manifest = target / MANIFEST
    result = local if info["type"] == "directory" else local / Path(root).name
    complete = all((local / rel).is_file() and (local / rel).stat().st_size == meta["size"]
                   for rel, meta in expected.items())
    if complete and manifest.is_file() and json.loads(manifest.read_text()) == {"url": url, "files": expected}:
        return result
    manifest.unlink(missing_ok=True)  # another version, or an incomplete copy: fetch (matching files are kept)
    sources = ({rel: f"{root.rstrip('/')}/{rel}" for rel in expected} if info["type"] == "directory"
               else {Path(root).name: root})
    download_files(fs, sources, expected, local, f"{what} {url}")
    manifest.write_text(json.dumps({"url": url, "files": expected}))
    return result


def download_files(fs, sources: dict[str, str], expected: dict[str, dict], local: Path, what: str) -> None:
    """Download `sources` (relative name -> remote path) under `local` in parallel, each to a temporary name renamed
    when its size (`expected[rel]["size"]`) and MD5 (a plain `etag`) check out; files already there and intact are
    kept (a resumed download). Errors name `what`."""
    local.mkdir(parents=True, exist_ok=True)

    def download(rel: str) -> None:
        destination = local / rel
        meta = expected[rel]
        if destination.is_file() and destination.stat().st_size == meta["size"] and _checks(destination, meta):
            return  # resumed: already here
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_name(f".{destination.name}.partial")
        fs.get_file(sources[rel], str(partial))
        if partial.stat().st_size != meta["size"] or not _checks(partial, meta):
            partial.unlink(missing_ok=True)
            raise ConfigError(f"{what}: {rel} arrived damaged (size or checksum differs); fetch again")
        os.replace(partial, destination)

    try:
        with ThreadPoolExecutor(max_workers=max(1, min(WORKERS, len(sources)))) as pool:
            list(pool.map(download, sorted(sources)))
    except ConfigError:
        raise
    except Exception as exc:  # as above, during the transfer
        raise ConfigError(f"{what}: download failed: {explain(exc, endpoint_of(fs))}") from None


def _checks(path: Path, meta: dict) -> bool:
    """A plain ETag (no `-N` multipart suffix) is the object's MD5: compare it; otherwise the size must do."""
    etag = meta.get("etag", "").strip('"')
    if len(etag) == 32 and "-" not in etag:
        return _md5(path) == etag
    return True


def clear(url: str) -> None:
    """Drop a URL's cached copy."""
    shutil.rmtree(cache_root() / hashlib.sha256(url.encode()).hexdigest()[:24], ignore_errors=True)

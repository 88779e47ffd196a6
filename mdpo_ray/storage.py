"""Where a run's files live: a directory (one every node shares, on a cluster) or an object store,
`output_dir: s3://bucket/prefix`.

Ray Train writes the checkpoints to either through pyarrow.fs (its storage_path). The run's other
files go through the same pyarrow filesystem here: the reference log-prob cache, the export, the sweep
report, the metrics MLflow never got. What a library can only write as local files (save_pretrained) is
written to a temp dir on the node and uploaded; what it can only read from local files (a model or data that
`model.name_or_path` or `data.train` puts on S3) is downloaded once per node (`staged`). The endpoint and
credentials are the AWS SDK's, as for Ray: an instance profile, or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
and AWS_ENDPOINT_URL for an S3-compatible store (MinIO, Ceph, R2, GCS's XML API).

Only s3:// is taken: it is what Ray's storage docs lead with and what the tests run against (an S3
server on 127.0.0.1). Anything else that looks like a URI is refused when the config is validated,
never made into a local folder whose name has a colon in it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

OBJECT_STORE_SCHEMES = ("s3",)
# Schemes a user may mean but this run cannot write to; a path starting `gs//` is one missing its colon.
_KNOWN_SCHEMES = {"s3", "s3a", "s3n", "gs", "gcs", "az", "abfs", "abfss", "adl", "hdfs", "viewfs", "oss", "file",
                  "http", "https", "ftp", "sftp", "mock"}
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")  # S3's rule for bucket names


def is_remote(location: str | os.PathLike[str]) -> bool:
    """An object-store URI (s3://bucket/prefix), not a local or shared-filesystem path."""
    return isinstance(location, str) and location.startswith(tuple(f"{s}://" for s in OBJECT_STORE_SCHEMES))


def looks_like_uri(value: str) -> bool:
    """Whether `value` is, or was meant as, a URI (s3://x, s3:/x, s3:x, s3//x, foo://x): not to be made
    into a local path."""
    head = value.split("/", 1)[0]
    return bool(_URI.match(value)) or ":" in head or (head.lower() in _KNOWN_SCHEMES and value[len(head):].startswith("//"))


def check_location(value: str, *, read: bool = False) -> str:
    """`value` as a run location (`read`: a model or data location): a path or name unchanged, an s3:// URI
    without a trailing slash; else a ValueError that says what was meant and what is taken (raised while the
    config is validated)."""
    if not looks_like_uri(value):
        return value
    taken = ("use a hub name, a filesystem path (on a cluster, one every node mounts) or an S3 URI, s3://bucket/key"
             if read else "use a filesystem path (on a cluster, one every node mounts, e.g. /mnt/shared/mdpo_runs) "
             "or an S3 URI, s3://bucket/prefix")
    match = _URI.match(value)
    if match is None:
        head, rest = value.split("/", 1)[0], value.split("/", 1)[1] if "/" in value else ""
        scheme = head.split(":", 1)[0]
        tail = (head.split(":", 1)[1] if ":" in head else "") + ("/" + rest if rest else "")
        meant = f"; did you mean {scheme}://{tail.lstrip('/')}?" if scheme.lower() in _KNOWN_SCHEMES else "."
        kept = "It is not looked up as a hub name or a local path" if read else \
            f"It is not made into a local folder named {head!r}"
        raise ValueError(f"{value!r} is neither a path nor a URI (scheme://...){meant} {kept}: {taken}")
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme not in OBJECT_STORE_SCHEMES:
        hint = {"gs": " (Google Cloud Storage serves S3's API: s3://bucket with AWS_ENDPOINT_URL="
                      "https://storage.googleapis.com and an HMAC key)",
                "file": f" (here: {rest or '/'})"}.get("gs" if scheme == "gcs" else scheme, "")
        raise ValueError(f"{value!r}: a run cannot {'read from' if read else 'write to'} {scheme}:// storage; "
                         f"{taken}{hint}")
    bucket, _, prefix = rest.partition("/")
    parts = prefix.rstrip("/").split("/") if prefix.rstrip("/") else []
    if not _BUCKET.match(bucket) or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"{value!r} is not an S3 location: want s3://bucket/prefix, with a bucket name of 3-63 "
                         "lowercase letters, digits, '.' or '-' and no empty, '.' or '..' part in the prefix")
    return "/".join([f"s3://{bucket}", *parts])


def join(location: str | os.PathLike[str], *parts: str) -> str:
    """`location`/part/...: a URI stays a URI (Path would fold s3:// into s3:/)."""
    if is_remote(location):
        return "/".join([str(location).rstrip("/"), *parts])
    return str(Path(location, *parts))


def display(fs_path: str, like: str) -> str:
    """A pyarrow filesystem path (`bucket/key` for S3, as Ray's Checkpoint.path) as the URI a user types."""
    return f"{like.split('://', 1)[0]}://{fs_path}" if is_remote(like) else fs_path


# The AWS SDK's defaults (1 s to connect, and a request cut when no byte arrives for 3 s) fail a run on an
# S3-compatible store that is merely busy: a MinIO or B2 under load, or a ListObjects over many checkpoints
# ("curlCode: 28 ... Less than 1 bytes/sec transferred the last 3 seconds", as reported to Arrow, Ray and
# other pyarrow users). A dead endpoint still fails, within a minute.
S3_CONNECT_TIMEOUT_S = 10.0
S3_REQUEST_TIMEOUT_S = 60.0


def _s3(bucket: str):
    """An S3 filesystem with the timeouts above. Endpoint, credentials and region as pyarrow's from_uri finds
    them: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL for an S3-compatible store, else the bucket's own region."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    return _s3_filesystem(endpoint, None if endpoint else bucket)


@functools.cache
def _s3_filesystem(endpoint: str | None, bucket: str | None):
    """One per endpoint (or AWS bucket, whose region is looked up once) and process: a client's start-up may
    ask the instance metadata service for credentials."""
    import pyarrow.fs

    region = pyarrow.fs.FileSystem.from_uri(f"s3://{bucket}")[0].region if bucket else None
    return pyarrow.fs.S3FileSystem(endpoint_override=endpoint, region=region,
                                   connect_timeout=S3_CONNECT_TIMEOUT_S, request_timeout=S3_REQUEST_TIMEOUT_S)


def _fs(location: str):
    """(pyarrow filesystem, its path) for a location: `bucket/key` on S3, an absolute path locally."""
    import pyarrow.fs

    if is_remote(location):
        path = str(location).split("://", 1)[1].rstrip("/")
        return _s3(path.split("/", 1)[0]), path
    return pyarrow.fs.LocalFileSystem(), str(Path(location).absolute())


def for_ray(location: str | os.PathLike[str]):
    """(path, filesystem) as Ray Train and Tune take a location (storage_path and storage_filesystem, or a
    restore's path and storage_filesystem): an S3 URI as its path on the filesystem above, so Ray's uploads,
    listings and restores get the same timeouts; a local path as it is, with no filesystem (Ray's own)."""
    if not is_remote(location):
        return str(location), None
    fs, path = _fs(str(location))
    return path, fs


def exists(location: str | os.PathLike[str]) -> bool:
    """A file, a directory, or (object store) any object under this prefix."""
    import pyarrow.fs

    if not is_remote(location):
        return Path(location).exists()
    fs, path = _fs(str(location))
    if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
        return True
    return bool(fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True, recursive=False)))


def is_file(location: str | os.PathLike[str]) -> bool:
    import pyarrow.fs

    if not is_remote(location):
        return Path(location).is_file()
    fs, path = _fs(str(location))
    return fs.get_file_info(path).type == pyarrow.fs.FileType.File


def read_bytes(location: str | os.PathLike[str]) -> bytes:
    if not is_remote(location):
        return Path(location).read_bytes()
    fs, path = _fs(str(location))
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(location: str | os.PathLike[str], data: bytes) -> None:
    """Whole or not at all: a concurrent reader never sees half a file. Locally a write to a random name
    then a rename (ranks on two nodes can share a pid and a file system); an object appears whole when
    its upload completes."""
    if not is_remote(location):
        target = Path(location)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.tmp{uuid.uuid4().hex}")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        return
    fs, path = _fs(str(location))
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def append_text(location: str | os.PathLike[str], text: str) -> None:
    """Locally an append; an object cannot be appended to, so it is read and written back whole (one
    writer: rank 0 of one run)."""
    if not is_remote(location):
        Path(location).parent.mkdir(parents=True, exist_ok=True)
        with Path(location).open("a") as f:
            f.write(text)
        return
    before = read_bytes(location) if is_file(location) else b""
    write_bytes(location, before + text.encode())


def upload_dir(local_dir: Path, location: str) -> None:
    """Copy a local directory's files under an object-store prefix (pyarrow's copy, as Ray's uploads)."""
    import pyarrow.fs

    fs, path = _fs(location)
    pyarrow.fs.copy_files(str(local_dir), path, source_filesystem=pyarrow.fs.LocalFileSystem(),
                          destination_filesystem=fs)


def download_dir(location: str, local_dir: Path) -> None:
    import pyarrow.fs

    fs, path = _fs(location)
    local_dir.mkdir(parents=True, exist_ok=True)
    pyarrow.fs.copy_files(path, str(local_dir), source_filesystem=fs,
                          destination_filesystem=pyarrow.fs.LocalFileSystem())


@contextmanager
def local_dir(location: str) -> Iterator[Path]:
    """A local directory to write `location`'s files into: the location itself, or, for an object store,
    a temp dir on this node whose files are uploaded to it when the block ends without an error."""
    if not is_remote(location):
        yield Path(location)
        return
    with tempfile.TemporaryDirectory(prefix="mdpo-upload-") as tmp:
        yield Path(tmp)
        upload_dir(Path(tmp), location)


_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


def staged(location: str, *, weights: bool = True) -> str:
    """A local path for reading `location`: itself if local; for an object (a data file) or a prefix (a model
    directory) on object storage, a copy on this node, downloaded once and shared by the node's processes.
    transformers and datasets read only local files: a model or data on S3 is read through this (a node's
    ranks and sampling actors each get the same copy). `weights=False` leaves a model's weight files out: what
    a tokenizer, a config or a plan reads, where a 7B model's weights would be 14 GB per node for nothing.
    The copy's name covers the objects' sizes and times, so a location written again is downloaded again,
    never read stale."""
    import pyarrow.fs
    from filelock import FileLock

    if not is_remote(location):
        return str(location)
    fs, path = _fs(location)
    single = fs.get_file_info(path)
    if single.type == pyarrow.fs.FileType.File:  # a data file: the copy keeps its name (its suffix picks the reader)
        objects = {PurePosixPath(path).name: single}
    else:
        listed = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True, allow_not_found=True))
        objects = {i.path[len(path) + 1:]: i for i in listed if i.type == pyarrow.fs.FileType.File
                   and (weights or not i.path.endswith(_WEIGHTS))}
    if not objects:
        raise FileNotFoundError(f"{location}: no such object or prefix on object storage")
    version = hashlib.sha256(repr([location, *sorted((n, i.size, i.mtime_ns) for n, i in objects.items())]).encode())
    root = Path(tempfile.gettempdir(), "mdpo-staged", version.hexdigest()[:20])
    local = root / next(iter(objects)) if single.type == pyarrow.fs.FileType.File else root
    if (root / ".complete").exists():
        return str(local)
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):  # one download per node; the node's other processes wait for it
        if not (root / ".complete").exists():
            partial = root.with_name(f"{root.name}.partial-{uuid.uuid4().hex}")
            for name, info in objects.items():
                copy = partial / name
                copy.parent.mkdir(parents=True, exist_ok=True)
                pyarrow.fs.copy_files(info.path, str(copy), source_filesystem=fs,
                                      destination_filesystem=pyarrow.fs.LocalFileSystem())
                # The object's own time: every node's copy is then the same file to datasets' fingerprint.
                os.utime(copy, ns=(info.mtime_ns, info.mtime_ns))
            (partial / ".complete").touch()
            shutil.rmtree(root, ignore_errors=True)
            os.replace(partial, root)
    return str(local)


def probe_writable(location: str) -> None:
    """Write and delete a small object under `location`; raises OSError (pyarrow's, naming the bucket and
    the AWS error) when the bucket is missing, the credentials are refused or the endpoint is down."""
    fs, path = _fs(location)
    marker = f"{path}/.mdpo-write-check-{uuid.uuid4().hex}"
    with fs.open_output_stream(marker) as stream:
        stream.write(b"")
    fs.delete_file(marker)

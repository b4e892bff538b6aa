"""Object storage for a search's experiment (`--storage URI`): S3, GCS or any URI `pyarrow.fs.FileSystem.from_uri`
takes, an S3-compatible server among them (`s3://bucket/prefix?endpoint_override=host:9000&scheme=http`).

Ray Tune keeps the experiment there (its `storage_path`): the trials' checkpoints and reports, its own state. The
driver keeps its working copy in --results-dir and uploads galaxy_tune's files beside Ray's. Credentials come from
the usual places (AWS_ACCESS_KEY_ID and the rest, config files, instance roles), never from the URI, which search.json
keeps. `object_storage` refuses, before anything starts, a URI pyarrow does not take, an endpoint that does not
answer, a bucket that does not exist and refused credentials.

The prepared data reaches every node through the storage too: the driver uploads it once (`share_folder`, under
root/shared/, named by a checksum of what it was made from), and each node downloads it once into its own cache
(`fetch_folder`, GALAXY_TUNE_CACHE or ~/.cache/galaxy_tune), checked against the sizes and sha256 of the upload.

Any machine with the credentials can go on from the storage alone: `pull` makes a local working copy of a search
or a retrain without its weights (for `search --resume`, `retrain` and `report`), `upload_folder` sends a
finished retrain, and `download_all` fetches a model for `predict`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pyarrow import fs as pafs

from . import layout
from .errors import GalaxyTuneError

ANSWER_WAIT_S = 3.0  # how long the endpoint has to accept a connection
TRIAL_FILES = ("result.json", "progress.csv", "params.json", "error.txt")  # a trial's reports and errors, no weights
SHARED = "shared"  # root/shared/<name>: folders that every node downloads once
MANIFEST = "manifest.json"  # a shared folder's files, sizes and sha256, written last
PREPARED = "prepared"  # the node cache's folder of prepared data
CHUNK = 8 << 20


def copy_hashed(source, out) -> tuple[int, str]:
    """Stream `source` into `out` in chunks; the bytes copied and their sha256."""
    digest, size = hashlib.sha256(), 0
    while chunk := source.read(CHUNK):
        digest.update(chunk)
        out.write(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def node_cache() -> Path:
    """This node's cache of shared folders: GALAXY_TUNE_CACHE, or ~/.cache/galaxy_tune."""
    return Path(os.environ.get("GALAXY_TUNE_CACHE") or "~/.cache/galaxy_tune").expanduser()


@dataclass(frozen=True)
class Storage:
    """Where experiments go: `root` ("bucket/prefix") in `filesystem`."""

    uri: str
    filesystem: pafs.FileSystem
    root: str

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def writer(self, path: str):
        """An output stream to `path` (a folder storage makes its parent folder first; object storage has none)."""
        if isinstance(self.filesystem, pafs.LocalFileSystem):
            self.filesystem.create_dir(path.rpartition("/")[0], recursive=True)
        return self.filesystem.open_output_stream(path)

    def upload(self, local: Path, *parts: str) -> None:
        """Copy the local file to root/parts (the file's name when parts are none)."""
        with open(local, "rb") as source, self.writer(self.path(*parts or (local.name,))) as out:
            out.write(source.read())

    def trying_once(self) -> Storage:
        """This storage with one try per S3 request, for uploads that a later one repeats: a server that does not
        answer fails them after one request instead of holding the caller through pyarrow's retries."""
        if not isinstance(self.filesystem, pafs.S3FileSystem):
            return self
        options = self.filesystem.__reduce__()[1][0]  # what it was made with, as pickle remakes it
        return replace(self, filesystem=pafs.S3FileSystem(
            **options, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1)))

    def upload_views(self, experiment: Path, names: list[str], say: bool = True) -> bool:
        """The experiment's own files of these names (those that exist), beside Ray's under root/<its name>; False,
        and (if `say`) a line saying so, when the storage did not take them."""
        try:
            for name in names:
                if (experiment / name).is_file():
                    self.upload(experiment / name, experiment.name, name)
        except OSError as err:
            if say:
                print(f"galaxy_tune: could not upload {', '.join(names)} to {self.path(experiment.name)} "
                      f"({str(err).splitlines()[0]})", file=sys.stderr)
            return False
        return True

    def exists(self, *parts: str) -> bool:
        return self.filesystem.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def share_folder(self, local: Path, files: list[str], identity: list[str]) -> tuple[str, bool]:
        """Upload `files` of the local folder once, to root/shared/<its name>-<key>, the key a checksum of its
        `identity` files (what the folder was made from). The manifest (each file's size and sha256) goes last, so
        a shared folder that has one is complete. Returns the shared name, and whether this call uploaded it."""
        key = hashlib.sha256(b"".join((local / f).read_bytes() for f in identity)).hexdigest()[:16]
        name = f"{local.name}-{key}"
        if self.exists(SHARED, name, MANIFEST):
            return name, False
        manifest = {}
        for file in files:
            with open(local / file, "rb") as source, self.writer(self.path(SHARED, name, file)) as out:
                size, sha256 = copy_hashed(source, out)
            manifest[file] = {"size": size, "sha256": sha256}
        with self.writer(self.path(SHARED, name, MANIFEST)) as out:
            out.write(json.dumps(manifest, indent=1).encode())
        return name, True

    def fetch_folder(self, name: str, cache: Path, node: str) -> Path:
        """The shared folder `name` in the node-local `cache`, downloaded and checked against its manifest the
        first time: concurrent callers on one node wait for that one download (a file lock)."""
        folder = cache / name
        cache.mkdir(parents=True, exist_ok=True)
        with open(cache / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if (folder / MANIFEST).is_file():
                return folder
            with self.filesystem.open_input_stream(self.path(SHARED, name, MANIFEST)) as source:
                manifest = json.loads(source.read())
            needed, free = sum(f["size"] for f in manifest.values()), shutil.disk_usage(cache).free
            if needed > free:
                raise GalaxyTuneError(f"node {node}: the prepared data {name} needs {needed / 1e9:.2f} GB in {cache}, "
                                      f"which has {free / 1e9:.2f} GB free: free space there, or set GALAXY_TUNE_CACHE "
                                      "to a folder on a larger disk on every node")
            partial = cache / f".{name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            started = time.monotonic()
            for file, expected in manifest.items():
                (partial / file).parent.mkdir(parents=True, exist_ok=True)
                with self.filesystem.open_input_stream(self.path(SHARED, name, file)) as source, \
                        open(partial / file, "wb") as out:
                    copied = copy_hashed(source, out)
                if copied != (expected["size"], expected["sha256"]):
                    shutil.rmtree(partial, ignore_errors=True)
                    raise GalaxyTuneError(f"node {node}: {file} of the shared data {self.path(SHARED, name)} is not "
                                          "what was uploaded (its size or sha256 differs): delete that folder in the "
                                          "storage, and run the search again to upload it anew")
            (partial / MANIFEST).write_text(json.dumps(manifest, indent=1))
            os.replace(partial, folder)
            seconds = time.monotonic() - started
            print(f"node {node}: fetched {needed / 1e6:.1f} MB of prepared data from {self.path(SHARED, name)} in "
                  f"{seconds:.1f} s ({needed / 1e6 / max(seconds, 1e-3):.0f} MB/s)", flush=True)
        return folder

    def download(self, local: Path, *parts: str) -> None:
        """Copy root/parts, if it is there, to the local file."""
        try:
            with self.filesystem.open_input_stream(self.path(*parts)) as source:
                data = source.read()
        except FileNotFoundError:  # a trial without errors has no error.txt
            return
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(data)

    def download_all(self, local: Path) -> None:
        """Everything under root (e.g. a retrained model's hf/ folder) into the local folder."""
        if self.filesystem.get_file_info(self.root).type != pafs.FileType.Directory:
            raise GalaxyTuneError(f"{self.uri}: no folder there: give a retrain's <method>-seed<S>/hf folder in the "
                                  "storage")
        pafs.copy_files(self.root, str(local), source_filesystem=self.filesystem)

    def download_folder(self, name: str, local: Path, keep: Callable[[str], bool] = lambda _: True) -> int:
        """The files under root/name whose path inside it `keep` takes, into the local folder, each with the
        storage's modification time (what says which search is newest); the number of files copied."""
        copied, inside = 0, self.path(name) + "/"
        for info in self.filesystem.get_file_info(pafs.FileSelector(self.path(name), recursive=True,
                                                                    allow_not_found=True)):
            relative = info.path.removeprefix(inside)
            if info.type != pafs.FileType.File or not keep(relative):
                continue
            self.download(local / relative, name, relative)
            if info.mtime is not None:
                os.utime(local / relative, (info.mtime.timestamp(), info.mtime.timestamp()))
            copied += 1
        return copied

    def download_trials(self, experiment: str, local: Path) -> None:
        """Each trial's reports and errors (TRIAL_FILES, not its checkpoints) into local/trial_*."""
        self.download_folder(experiment, local, lambda path: path.startswith("trial_") and path.count("/") == 1
                             and path.rpartition("/")[2] in TRIAL_FILES)

    def pull(self, name: str, local: Path, only: tuple[str, ...] | None = None) -> Path:
        """A working copy of the folder `name` (a search or a retrain) in `local`/name: its files without the
        weights (checkpoints and exported models), or `only` the top-level files of these names."""
        def keep(path: str) -> bool:
            if only is not None:
                return path in only
            return not any(part.startswith("checkpoint_") or part == layout.HF_FOLDER for part in path.split("/"))
        self.download_folder(name, local / name, keep)
        return local / name

    def folders(self, *marks: str) -> list[str]:
        """The folders under root that hold a file of one of these names (a search's best.json, a retrain's
        retrain.json), the shared data's aside."""
        found = self.filesystem.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return sorted(i.base_name for i in found if i.type == pafs.FileType.Directory and i.base_name != SHARED
                      and any(self.exists(i.base_name, mark) for mark in marks))

    def upload_folder(self, local: Path, name: str) -> None:
        """The local folder, everything in it, to root/name."""
        pafs.copy_files(str(local), self.path(name), destination_filesystem=self.filesystem)

    def fetch_prepared(self, name: str, node: str) -> Path:
        """The shared prepared data `name` in this node's cache (see `fetch_folder`)."""
        return self.fetch_folder(name, node_cache() / PREPARED, node)

def sub_uri(uri: str, *parts: str) -> str:
    """The URI of a folder inside `uri` (its query, such as an endpoint_override, kept)."""
    split = urlsplit(uri)
    return urlunsplit(split._replace(path="/".join([split.path.rstrip("/"), *parts])))


def object_storage(uri: str) -> Storage:
    """The storage of `--storage URI`, checked: one line naming the fix when it can't be used."""
    parts = urlsplit(uri)
    if parts.username or parts.password or any(k in parts.query for k in ("secret_key", "session_token")):
        raise GalaxyTuneError(f"--storage: give the credentials in the environment (AWS_ACCESS_KEY_ID and "
                              f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE), not in the URI, which search.json keeps")
    try:
        filesystem, root = pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise GalaxyTuneError(f"--storage {uri}: {err}; give a URI such as s3://bucket/prefix or gs://bucket/prefix "
                              "(an S3-compatible server: s3://bucket/prefix?endpoint_override=host:9000&scheme=http)"
                              ) from None
    if isinstance(filesystem, pafs.LocalFileSystem):  # file:///shared/path: a folder, made if need be
        filesystem.create_dir(root)
        return Storage(uri, filesystem, root)
    if isinstance(filesystem, pafs.S3FileSystem):
        check_answers(uri, parts.query)
    bucket = root.split("/", 1)[0]
    try:
        found = filesystem.get_file_info(bucket)
    except OSError as err:
        raise GalaxyTuneError(f"--storage {uri}: {refused(err)}") from None
    if found.type == pafs.FileType.NotFound:
        raise GalaxyTuneError(f"--storage {uri}: the bucket {bucket} does not exist: create it (e.g. `aws s3 mb "
                              f"s3://{bucket}`), or give one that does")
    return Storage(uri, filesystem, root)


def check_answers(uri: str, query: str) -> None:
    """Refuse an S3 endpoint that accepts no connection within ANSWER_WAIT_S (pyarrow would retry for minutes)."""
    options = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
    endpoint = options.get("endpoint_override")
    if not endpoint:
        return  # AWS itself: its answer, or its refusal of the credentials, comes with the bucket's check
    secure = options.get("scheme", "https") == "https"
    host, _, port = endpoint.split("://")[-1].partition(":")
    try:
        socket.create_connection((host, int(port or (443 if secure else 80))), timeout=ANSWER_WAIT_S).close()
    except OSError as err:
        raise GalaxyTuneError(f"--storage {uri}: nothing answers at {endpoint} within {ANSWER_WAIT_S:g} s "
                              f"({err.strerror or err}): start the server, or check endpoint_override") from None


def refused(err: OSError) -> str:
    """Why the storage refused a request, and the fix, from pyarrow's message."""
    text = str(err)
    if any(code in text for code in ("ACCESS_DENIED", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403")):
        return (f"the credentials were refused ({text.splitlines()[0]}): set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) to ones that may write there")
    return f"the storage did not answer as expected ({text.splitlines()[0]})"

"""Object storage for a search's experiment (`--storage URI`): S3, GCS or any URI `pyarrow.fs.FileSystem.from_uri`
takes, an S3-compatible server among them (`s3://bucket/prefix?endpoint_override=host:9000&scheme=http`).

Ray Tune keeps the experiment there (its `storage_path`): the trials' checkpoints and reports, its own state. The
driver keeps its working copy in --results-dir and uploads galaxy_tune's files beside Ray's. Credentials come from
the usual places (AWS_ACCESS_KEY_ID and the rest, config files, instance roles), never from the URI, which search.json
keeps. `object_storage` refuses, before anything starts, a URI pyarrow does not take, an endpoint that does not
answer, a bucket that does not exist and refused credentials.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pyarrow import fs as pafs

from .errors import GalaxyTuneError

ANSWER_WAIT_S = 3.0  # how long the endpoint has to accept a connection
TRIAL_FILES = ("result.json", "progress.csv", "params.json", "error.txt")  # a trial's reports and errors, no weights


@dataclass(frozen=True)
class Storage:
    """Where experiments go: `root` ("bucket/prefix") in `filesystem`."""

    uri: str
    filesystem: pafs.FileSystem
    root: str

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def upload(self, local: Path, *parts: str) -> None:
        """Copy the local file to root/parts (the file's name when parts are none)."""
        with open(local, "rb") as source, self.filesystem.open_output_stream(self.path(*parts or (local.name,))) as out:
            out.write(source.read())

    def upload_views(self, experiment: Path, names: list[str]) -> None:
        """The experiment's own files of these names (those that exist), beside Ray's under root/<its name>."""
        for name in names:
            if (experiment / name).is_file():
                self.upload(experiment / name, experiment.name, name)

    def download(self, local: Path, *parts: str) -> bool:
        """Copy root/parts to the local file; False when there is none."""
        try:
            with self.filesystem.open_input_stream(self.path(*parts)) as source:
                data = source.read()
        except FileNotFoundError:
            return False
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(data)
        return True

    def download_trials(self, experiment: str, local: Path) -> int:
        """Each trial's reports and errors (TRIAL_FILES, not its checkpoints) into local/trial_*; how many trials."""
        folders = [i.base_name for i in self.filesystem.get_file_info(pafs.FileSelector(self.path(experiment)))
                   if i.type == pafs.FileType.Directory and i.base_name.startswith("trial_")]
        for folder in folders:
            for name in TRIAL_FILES:
                self.download(local / folder / name, experiment, folder, name)
        return len(folders)


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

"""The Ray cluster a search runs on: start Ray locally, or join a cluster (token authentication included),
check that the trials' resources exist before any trial is queued, and tell a trial which device Ray gave it."""

from __future__ import annotations

import math
import os
import signal
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import ray
from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

from ..errors import GalaxyTuneError

if TYPE_CHECKING:
    import torch

PROBE_TIMEOUT_S = 5.0


def start_ray(address: str | None) -> None:
    """Join the given cluster, or start Ray locally with its dashboard on 127.0.0.1.

    A SIGTERM handler of this process's own (the CLI's, which stops a search as Ctrl-C does) is kept: `ray.init`
    replaces it with one that exits at once, and Ray's core worker with one that aborts.
    """
    own_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        _start_ray(address)
    finally:
        if callable(own_sigterm) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, own_sigterm)


def _start_ray(address: str | None) -> None:
    if address and address != "auto":  # auto: the cluster `ray start` runs on this machine
        if check_cluster(address):
            # What `ray start` and a plain `ray.init()` do (token mode when RAY_AUTH_MODE is unset and a token
            # exists), which ray.init skips for an explicit address.
            from ray._private.authentication.authentication_token_setup import (
                maybe_enable_token_auth_if_token_available)

            maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if address:
        context = ray.init(address=address, log_to_driver=True)
    else:
        context = ray.init(include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True)
    if context.dashboard_url:
        print(dashboard_hint(context.dashboard_url))


def dashboard_hint(url: str) -> str:
    """How to open the dashboard at `url`: its port is 8265, or the next free one when another Ray has 8265."""
    port = url.rsplit(":", 1)[-1]
    return (f"Ray dashboard: http://{url} (token login: the token is in ~/.ray/auth_token, or run "
            f"`ray get-auth-token`; from another machine: ssh -L {port}:127.0.0.1:{port} this-host)")


def local_token() -> str | None:
    """The cluster token where Ray looks for it: $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return (path.read_text().strip() or None) if path.is_file() else None


def check_cluster(address: str) -> bool:
    """Ask the cluster's GCS for its id, as `ray.init` would first do; returns whether it wants our token.

    Refuses at once what `ray.init` would meet only after minutes of retries (nothing listening) or after a
    page of retries and a traceback (a cluster that wants a token we don't have, or refuses ours).
    """
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise GalaxyTuneError(f"--address {address!r} is not HOST:PORT: pass the head node's address, "
                              "e.g. 10.0.0.1:6379 (what `ray start --head` printed)")
    unreachable = (f"no Ray cluster answers at {address} ({{why}}): check the address with `ray status --address "
                   f"{address}` on a cluster node, that `ray start --head` runs there, and that no firewall blocks "
                   "the port")
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as err:
        raise GalaxyTuneError(unreachable.format(why=err.strerror or err)) from None
    if address.startswith("ray://"):
        return local_token() is not None  # Ray Client: its server, not the GCS, is at this port
    token = local_token()
    wants_token = not _gcs_answers(host, port, None)
    if wants_token and token is None:
        raise GalaxyTuneError(f"the Ray cluster at {address} uses token authentication and this machine has no "
                              "token: run `ray get-auth-token` on the head node and put what it prints in "
                              "~/.ray/auth_token here (or in the RAY_AUTH_TOKEN environment variable)")
    if wants_token and not _gcs_answers(host, port, token):
        raise GalaxyTuneError(f"the Ray cluster at {address} refused this machine's token (from "
                              f"{'RAY_AUTH_TOKEN' if os.environ.get('RAY_AUTH_TOKEN') else '~/.ray/auth_token'}): "
                              "replace it with what `ray get-auth-token` prints on the head node")
    return wants_token


def _gcs_answers(host: str, port: str, token: str | None) -> bool:
    """False when the GCS refuses the call as unauthenticated; True when it answers (or fails otherwise)."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), metadata=metadata, timeout=PROBE_TIMEOUT_S)
        except grpc.RpcError as err:
            return err.code() != grpc.StatusCode.UNAUTHENTICATED  # anything else: ray.init says it best
    return True


def check_resources(cpus_per_trial: float, gpus_per_trial: float | None, device: str,
                    max_concurrent: int | None) -> tuple[float, int]:
    """(GPUs per trial, trials at once) for this cluster; refuses requests no node can satisfy (Ray would leave
    such trials PENDING forever)."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    total_gpus = sum(n.get("GPU", 0) for n in nodes)
    gpus = gpus_per_trial
    if gpus is None:
        gpus = 1.0 if device == "cuda" or (device == "auto" and total_gpus > 0) else 0.0
    if (gpus > 0 or device == "cuda") and total_gpus == 0:
        raise GalaxyTuneError(f"a trial asks for {gpus:g} GPU but this Ray cluster has no GPU: use --device cpu "
                              "(or --gpus-per-trial 0), or join a cluster with GPUs via --address")
    fits = [n for n in nodes if n.get("CPU", 0) >= cpus_per_trial and n.get("GPU", 0) >= gpus]
    if not fits:
        biggest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)))
        raise GalaxyTuneError(f"a trial asks for {cpus_per_trial} CPU / {gpus:g} GPU but the "
                              f"largest node has {biggest.get('CPU', 0):g} CPU / {biggest.get('GPU', 0):g} GPU: "
                              "lower --cpus-per-trial / --gpus-per-trial")
    slots = sum(math.floor(n.get("CPU", 0) / cpus_per_trial + 1e-9) if gpus == 0 else
                min(math.floor(n.get("CPU", 0) / cpus_per_trial + 1e-9),
                    math.floor(n.get("GPU", 0) / gpus + 1e-9)) for n in fits)
    return gpus, max(1, min(slots, max_concurrent or slots))


def trial_device(gpus: float) -> tuple[torch.device, float]:
    """The device this trial trains on, with its index, and the share of its memory the trial may use.

    Ray lists the trial's GPU alone in CUDA_VISIBLE_DEVICES, so torch numbers it 0; the index is looked up there in
    case Ray was told to leave that variable alone. Nothing here opens the GPU.
    """
    import torch  # here, not above: starting or joining Ray needs no torch

    if gpus == 0:
        return torch.device("cpu"), 1.0
    [gpu] = [str(i) for i in ray.get_gpu_ids()]  # one, even for a fraction of a GPU
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", visible.split(",").index(gpu) if visible else int(gpu)), gpus

"""The model server as a Ray Serve application: N replicas of one server's code behind Ray's gRPC proxy.

Each replica runs server.py's PredictionCache and ModelServer servicer and inference_server.py's
InferenceServicer unchanged; Ray's proxy calls a replica's method of the RPC's name. What the fleet adds
keeps a single server's guarantees:

- A change reaches every replica before it returns. SetCoefs and ReloadModel go to the one
  FleetCoordinator, which applies them one at a time as the replicas' `user_config`: Ray reconfigures
  every running replica in place, and starts every later one (scale-up, a restart after a crash) with
  the same config. The call returns once the application is RUNNING again, which Ray reports only when
  every replica runs the new version. So no Predict that starts after SetCoefs returned answers from
  older coefficients, and of two racing SetCoefs the later is in force everywhere.
- Cache affinity: Ray's consistent-hash router sends the calls with one `session_id` to one replica, and
  `client.py --affinity` sends the row's `affinity_key`, so N replicas hold N caches of different rows.
- Every answer names its replica in the trailing metadata `replica`; GetStats, that replica's counters,
  names it in its `replica` field.

deploy/ray/serve.yaml deploys it; `python3 deploy/ray/fleet.py up` (make serve-ray) starts a local Ray
with it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any, NoReturn, cast

import grpc
import ray
from google.protobuf import empty_pb2
from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve import Deployment
from ray.serve.schema import ServeDeploySchema

from models import ModelError
from server import (
    SERVICE_NAME,
    TOKEN_NEEDED,
    ServerConfig,
    build_servicer,
    carries_token,
    inference_servicer,
    token_problem,
)
from stubs import ADMIN_TOKEN_ENV, pb2

log = logging.getLogger("ray.serve")

REPLICA_DEPLOYMENT = "ModelServerReplica"
SETTLE_TIMEOUT = 60.0  # seconds a change may take to reach every replica before the caller hears it failed
SETTLE_POLL = 0.02
# What an aborted call answers: the status Ray's proxy sends carries the error, and a gRPC client reads no
# message with a status that is not OK. Every empty message serializes to the same empty bytes.
ABORTED = empty_pb2.Empty()


class FleetError(Exception):
    """A change that did not reach every replica, with the reason."""


class _AbortedError(Exception):
    """A servicer called context.abort: the status is set on Ray's context."""


class AbortingContext:
    """The grpc.ServicerContext the servicers use, over Ray's context, which has no abort(): it sets the
    status Ray's proxy sends and ends the call."""

    def __init__(self, ray_context: Any):
        self._ray_context = ray_context

    def abort(self, code: Any, details: str) -> NoReturn:
        self._ray_context.set_code(code)
        self._ray_context.set_details(details)
        raise _AbortedError

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self._ray_context.invocation_metadata()


@serve.deployment(ray_actor_options={"num_cpus": 0})
class FleetCoordinator:
    """Applies the fleet's changes one at a time, each as a new version of the replicas' user_config."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._app_name = serve.get_replica_context().app_name

    async def publish(self, change: dict[str, Any]) -> str:
        """Apply the change to every replica; returns "" once all run it, or why they do not."""
        async with self._lock:
            try:
                await asyncio.to_thread(self._apply, change)
            except FleetError as error:
                return str(error)
        return ""

    def _apply(self, change: dict[str, Any]) -> None:
        client = controller_client()
        configs: dict[str, Any] = ray.get(client._controller.get_app_configs.remote())
        if self._app_name not in configs:
            raise FleetError(
                f"application {self._app_name!r} was not deployed from a config (deploy/ray/serve.yaml); "
                "serve.run() apps cannot change their replicas in place"
            )
        applications = {name: schema.model_dump(exclude_unset=True) for name, schema in configs.items()}
        replicas = _replica_options(applications[self._app_name])
        version = (replicas.get("user_config") or {}).get("version", 0) + 1
        replicas["user_config"] = {**change, "version": version}
        client.deploy_apps(ServeDeploySchema.model_validate({"applications": list(applications.values())}))
        wait_until_running(self._app_name, SETTLE_TIMEOUT)


def controller_client() -> Any:
    """Serve's client of its controller: what `serve deploy` and Serve's REST API apply configs through."""
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    if client is None:
        raise FleetError("Serve is not running on this Ray cluster")
    return client


def _replica_options(application: dict[str, Any]) -> dict[str, Any]:
    """The replicas' entry in the application's config, added if the config has none."""
    deployments = application.setdefault("deployments", [])
    for deployment in deployments:
        if deployment["name"] == REPLICA_DEPLOYMENT:
            return deployment
    deployments.append({"name": REPLICA_DEPLOYMENT})
    return deployments[-1]


def wait_until_running(app_name: str, timeout: float) -> None:
    """Wait until the application is RUNNING: every replica at its target version, none starting or updating.
    Right after a config is applied the application reads DEPLOYING, so RUNNING means the new one is in force."""
    deadline = time.monotonic() + timeout
    while True:
        application = serve.status().applications.get(app_name)
        status = application.status if application is not None else "NOT_STARTED"
        if status == "RUNNING":
            return
        if application is not None and status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise FleetError(f"application {app_name!r} is {status}: {application.message}")
        if time.monotonic() > deadline:
            raise FleetError(f"application {app_name!r} is still {status} after {timeout:g} s")
        time.sleep(SETTLE_POLL)


@serve.deployment
class ModelServerReplica:
    """One server's cache and servicers; Ray's gRPC proxy calls the method of each RPC's name."""

    def __init__(self, coordinator: Any, settings: dict[str, Any]):
        config = ServerConfig(
            cache_size=settings.get("cache_size", 10),
            model=Path(settings["model"]) if settings.get("model") else None,
            model_name=settings.get("model_name"),
            input_width=settings.get("input_width"),
        )
        self._cache, self._servicer = build_servicer(config)
        self._inference = inference_servicer(self._cache, self._servicer.model_stats())
        self._coordinator = coordinator
        self._admin_token = _admin_token()
        self._name = serve.get_replica_context().replica_id.unique_id
        self._trailer = [("replica", self._name)]

    def reconfigure(self, fleet_state: dict[str, Any]) -> None:
        """Ray calls this with the replicas' user_config on every change, and when a replica starts once there
        is one. A model file is then read again: a replica cannot tell that call from a change, and a second
        read at start costs less than serving an older file."""
        if fleet_state.get("coefs") is not None:
            self._cache.set_model(self._servicer.linear_model(fleet_state["coefs"]))
        else:
            self._servicer.reload()

    async def SetCoefs(self, request, grpc_context):
        if self._refuses(grpc_context):
            return ABORTED
        try:
            self._servicer.linear_model(request.coefs)  # bad coefs are refused here, before the fleet hears of them
        except ModelError as error:
            return pb2.SetCoefsResponse(error=str(error))
        return pb2.SetCoefsResponse(error=await self._publish({"coefs": list(request.coefs)}))

    async def ReloadModel(self, request, grpc_context):
        if self._refuses(grpc_context):
            return ABORTED
        try:
            await asyncio.to_thread(self._check_model_file_loads)
        except ModelError as error:
            return pb2.ReloadModelResponse(error=str(error))
        return pb2.ReloadModelResponse(error=await self._publish({}))

    def _refuses(self, grpc_context) -> bool:
        """A change without the admin token, where one is set, is PERMISSION_DENIED, as on a single server."""
        if self._admin_token is None or carries_token(grpc_context.invocation_metadata(), self._admin_token):
            return False
        grpc_context.set_code(grpc.StatusCode.PERMISSION_DENIED)
        grpc_context.set_details(TOKEN_NEEDED)
        return True

    def _check_model_file_loads(self) -> None:
        """A reload that would fail on every replica is refused before any replica tries it."""
        candidate = self._servicer.fresh_model_file()
        candidate.initialize()
        candidate.cleanup()

    async def _publish(self, change: dict[str, Any]) -> str:
        try:
            return await self._coordinator.publish.remote(change)
        except Exception as error:  # the coordinator restarting, or Ray's own failure: one line for the caller
            log.exception("publishing %s failed", sorted(change))
            return f"the change did not reach the fleet: {type(error).__name__}"

    def Predict(self, request, grpc_context):
        return self._answer(self._servicer.Predict, request, grpc_context)

    def GetStats(self, request, grpc_context):
        stats = self._answer(self._servicer.GetStats, request, grpc_context)
        stats.replica = self._name
        return stats

    def Check(self, request, grpc_context):
        """grpc.health.v1: what a load balancer or a Kubernetes gRPC probe asks of the proxy's port."""
        if request.service not in ("", SERVICE_NAME, self._inference.SERVICE_NAME):
            return self._answer(_unknown_service, request, grpc_context)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    def ServerLive(self, request, grpc_context):
        return self._answer(self._inference.ServerLive, request, grpc_context)

    def ServerReady(self, request, grpc_context):
        return self._answer(self._inference.ServerReady, request, grpc_context)

    def ModelReady(self, request, grpc_context):
        return self._answer(self._inference.ModelReady, request, grpc_context)

    def ServerMetadata(self, request, grpc_context):
        return self._answer(self._inference.ServerMetadata, request, grpc_context)

    def ModelMetadata(self, request, grpc_context):
        return self._answer(self._inference.ModelMetadata, request, grpc_context)

    def ModelConfig(self, request, grpc_context):
        return self._answer(self._inference.ModelConfig, request, grpc_context)

    def ModelStatistics(self, request, grpc_context):
        return self._answer(self._inference.ModelStatistics, request, grpc_context)

    def ModelInfer(self, request, grpc_context):
        return self._answer(self._inference.ModelInfer, request, grpc_context)

    def _answer(self, rpc, request, grpc_context):
        """Call the servicer's RPC as the gRPC server would, and name this replica in the trailing metadata."""
        grpc_context.set_trailing_metadata(self._trailer)
        try:
            return rpc(request, AbortingContext(grpc_context))
        except _AbortedError:
            return ABORTED


def _admin_token() -> bytes | None:
    """The admin token from the replica's environment (Ray's processes inherit `ray start`'s), as server.py
    reads it; a token that cannot travel in metadata stops the replica from starting, with the reason."""
    token = os.environ.get(ADMIN_TOKEN_ENV)
    if token is None:
        return None
    if problem := token_problem(token):
        raise ValueError(f"${ADMIN_TOKEN_ENV} {problem}")
    return token.encode()


def _unknown_service(request, context):
    context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")


def app(args: dict[str, Any]) -> serve.Application:
    """The application builder deploy/ray/serve.yaml names; args: cache_size, model, model_name, input_width."""
    known = {"cache_size", "model", "model_name", "input_width"}
    if unknown := sorted(set(args) - known):
        raise ValueError(f"unknown application args {unknown}; known: {sorted(known)}")
    replicas, coordinator = cast(Deployment, ModelServerReplica), cast(Deployment, FleetCoordinator)
    return replicas.bind(coordinator.bind(), args)

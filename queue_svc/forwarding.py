"""Forwarding a call to the run-control replica that owns its session (ownership.py).

A call about a session (SubmitMessage, CancelRun, PostReply, GetSession) may reach any replica (the
gateway balances calls round-robin). A replica that does not own the session forwards the request
unchanged to the owner's address from the lease row, with the caller's own authorization (so the
owner authenticates and audits the real caller), a mark that it was forwarded (never forwarded
twice: a replica reached by a forwarded call that does not own the session either answers
UNAVAILABLE/SESSION_OWNER_MOVED and the caller retries), and a timeout bounded by the caller's
deadline. The owner's answer, error details included, goes back as is. A forward that cannot reach
the owner (refused connection, or no answer within `attempt_seconds`: a dead or paused replica)
raises OwnerUnreachable; the servicer then waits for the owner's lease to expire and adopts the
session itself.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
from flynn.v1 import run_control_pb2_grpc as pb_grpc
from grpc.aio import ServicerContext

from flynn_runtime import errors, rich_status
from flynn_runtime.channels import client_channel
from queue_svc import metrics

FORWARDED = "x-flynn-forwarded"
#: Trailing metadata of a call about a session served by its owner: the owner's advertised address,
#: so a gateway that reaches the replicas through a list of addresses can send the session's next
#: calls (a cancel above all) straight there instead of paying a forwarding hop.
OWNER = "x-flynn-owner"
#: One forwarded attempt's timeout: far above a healthy owner's answer (ms), short enough that a
#: paused owner costs about one lease, not the caller's whole deadline.
ATTEMPT_SECONDS = 2.0


def _pairs(md: Any) -> list[tuple[str, str | bytes]]:
    return [(str(k), v) for k, v in (md or ())]


class OwnerUnreachable(Exception):
    """The owner's address did not answer: it is dead or paused; its lease will expire."""


class OwnerMoved(Exception):
    """The replica a remembered owner hint named answered that it no longer owns the session."""


class Peers:
    """One channel per peer replica address (created on first use, kept)."""

    def __init__(
        self, attempt_seconds: float = ATTEMPT_SECONDS, credentials: grpc.ChannelCredentials | None = None
    ) -> None:
        #: The mesh's client credentials (mutual TLS when a mesh CA is set; None: plaintext).
        self._credentials = credentials
        self._stubs: dict[str, pb_grpc.RunControlStub] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.attempt_seconds = attempt_seconds

    def stub(self, address: str) -> pb_grpc.RunControlStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = client_channel(address, retries=False, credentials=self._credentials)
            self._channels[address] = channel
            stub = self._stubs[address] = pb_grpc.RunControlStub(channel)
        return stub

    async def forward(
        self,
        method: str,
        request: Any,
        context: ServicerContext[Any, Any],
        address: str,
        deadline: float,
        hinted: bool = False,
    ) -> Any:
        incoming = _pairs(context.invocation_metadata())
        if any(k == FORWARDED for k, _ in incoming):
            raise errors.unavailable(
                "the session moved to another run-control replica while this call was forwarded; retry",
                reason="SESSION_OWNER_MOVED",
                retry_after=0.1,
            )
        if not address:
            raise OwnerUnreachable(address)
        metadata = [(k, v) for k, v in incoming if k == "authorization"] + [(FORWARDED, "1")]
        remaining = deadline - time.monotonic()
        timeout = max(min(self.attempt_seconds, remaining), 0.001)
        metrics.SESSIONS_FORWARDED.labels(method).inc()
        t0 = time.perf_counter()
        try:
            call = getattr(self.stub(address), method)(request, timeout=timeout, metadata=metadata)
            response = await call
            owner = [(k, v) for k, v in _pairs(await call.trailing_metadata()) if k == OWNER]
            if owner:
                context.set_trailing_metadata(owner)
            return response
        except grpc.aio.AioRpcError as e:
            code = e.code()
            trailing = _pairs(e.trailing_metadata())
            if not rich_status.answered(e) and (
                code == grpc.StatusCode.UNAVAILABLE
                or (code == grpc.StatusCode.DEADLINE_EXCEEDED and timeout < remaining)
            ):
                raise OwnerUnreachable(address) from None
            if hinted and code == grpc.StatusCode.UNAVAILABLE:
                err = rich_status.from_rpc_error(e)
                if err is not None and err.reason == "SESSION_OWNER_MOVED":
                    raise OwnerMoved(address) from None
            await context.abort(code, e.details() or "", trailing)
            raise  # abort raises; for the type checker
        finally:
            metrics.FORWARD_SECONDS.labels(method).observe(time.perf_counter() - t0)

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close(None)

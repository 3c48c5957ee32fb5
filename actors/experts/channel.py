"""The expert data plane: one persistent ZeroMQ channel per expert actor, opened once through Ray
and then used with no Ray task per layer (Ray keeps placement, restarts and health).

    server = ChannelServer(worker.compute, node_ip, secret, bound)   # the expert actor's end:
                                                   # actors/experts/channel_server.py
    transport = ChannelTransport(secret)                             # the dispatcher's seam
    transport(layer, [(actor, x, counts), ...]) -> [(y, compute_seconds) | Exception, ...]

Wire (ZeroMQ multipart; DEALER at the frontend, ROUTER at the expert; TCP on the node's
cluster address, never all interfaces):
    request  [REQUEST header + counts (int32 x k)] [rows: x (n, D) raw bytes, no pickling]
    reply    [REPLY header] [y (n, D) raw bytes]  or  [REPLY header, ok=0] [error text, UTF-8]
Row frames are sent and received without copies (`copy=False`): a received frame is viewed as
a tensor in place.
Security: ZeroMQ's PLAIN mechanism, checked by the server's ZAP handler: a peer must present
the engine's secret (made by the pool at start, actors/experts/pool.py, passed to both ends
through Ray); a wrong or missing one is refused before any message is read, and logged. Every
frame, from any peer, is bounded by the largest legitimate call (ZeroMQ's maxmsgsize: a peer
announcing more is disconnected at the frame's header), and a malformed call gets an error
reply while the server goes on serving (channel_server.py). PLAIN does not encrypt: the secret
and rows travel in the clear on the cluster network, like Ray's own traffic.
Waits block (zmq poll with a timeout): an idle channel uses no CPU.
Faults: while waiting for a reply, every `poll_s` the transport asks Ray whether the actor is
still alive (`ray.wait` on an `until_stopped(client, watch_s)` task of the actor, which fails
when the actor dies; it returns when this transport's own newer call supersedes it or after
`watch_s`, and is then re-armed: a transport's id is its own, so several frontends watching
one actor never end each other's watches). A dead actor, a passed `timeout_s` or a
failed (re)connect returns `PeerLost` (retriable: the dispatcher re-sends to a replica or,
after the restart, to the same actor, and the transport reconnects to the restarted actor's new
endpoint). An error raised inside the expert, or a call it finds malformed, returns
`ExpertError` (not retriable). A server thread that dies ends its actor's process, so a dead
channel is always a dead actor, which Ray restarts.
GPU: rows cross every transport as host tensors. On CUDA they are copied into page-locked
(pinned) memory from torch's caching host allocator (`host_rows`, `device_rows`), so copies use
DMA and a buffer is reused once its last reference (a sent ZeroMQ frame included) is gone and its
copy has finished; device-to-device transfer (CUDA IPC, NCCL) is not built yet.
Shapes: n rows for this actor, D hidden, k expert ids the actor holds.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import struct
import time
import uuid
import weakref
from collections.abc import Callable

import ray
import torch
import zmq

log = logging.getLogger(__name__)

USER = b"mixtral-ep"
REQUEST = struct.Struct("<QIIIB")      # sequence, layer, rows n, expert ids k, dtype code
REPLY = struct.Struct("<QdB")          # sequence, compute seconds, ok
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

Compute = Callable[[int, torch.Tensor, list[int]], tuple[torch.Tensor, float]]


class PeerLost(ConnectionError):
    """The expert actor died, restarts, or did not answer in time: send the call again."""


class ExpertError(RuntimeError):
    """The expert actor raised while computing, or found the call malformed: sending it again
    would fail again."""


def pinned_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` in pinned host memory, from torch's caching host allocator (which reuses
    a freed block only after the copies recorded on it have finished). Waits for the copy."""
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)


def host_rows(t: torch.Tensor) -> torch.Tensor:
    """Rows to send: `t` itself on CPU, a pinned host copy of a CUDA tensor."""
    return pinned_copy(t) if t.device.type == "cuda" else t


def empty_host_like(t: torch.Tensor) -> torch.Tensor:
    """An uninitialised host tensor like `t`, pinned if `t` is: where replies are gathered."""
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_pinned())


def device_rows(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Received host rows onto `device`: `t` itself on CPU; on CUDA an asynchronous copy from
    pinned memory (later work on the current stream is ordered after it)."""
    if device.type != "cuda":
        return t
    return (t if t.is_pinned() else pinned_copy(t)).to(device, non_blocking=True)


def as_bytes(t: torch.Tensor) -> memoryview:
    """`t`'s bytes, flat, no copy if contiguous (an empty tensor gives an empty view)."""
    return memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy())


def _as_rows(frame: zmq.Frame, dtype: torch.dtype, n: int) -> torch.Tensor:
    if n == 0:
        return torch.empty(0, 0, dtype=dtype)
    return torch.frombuffer(frame.buffer, dtype=torch.uint8).view(dtype).view(n, -1)


class _Peer:
    """The frontend's end of one actor's channel: a DEALER socket to the endpoint it opened."""

    def __init__(self, context: zmq.Context, actor, secret: str):
        endpoint = ray.get(actor.open_channel.remote(secret))
        self.socket = context.socket(zmq.DEALER)
        self.socket.plain_username, self.socket.plain_password = USER, secret.encode()
        self.socket.linger = 0
        self.socket.connect(endpoint)

    def close(self) -> None:
        self.socket.close(linger=0)


@dataclasses.dataclass
class _Sent:
    """Requests sent by `ChannelTransport.send`, awaiting `receive`."""
    requests: list
    results: list
    waiting: dict          # request index -> (peer, actor key, sequence)


class ChannelTransport:
    """The dispatcher's `transport` over channels; see the module docstring."""

    def __init__(self, secret: str, poll_s: float = 0.5, timeout_s: float = 30.0,
                 watch_s: float = 60.0):
        """`poll_s`: seconds between liveness checks while a reply is awaited; `timeout_s`: a
        reply's wait at most; `watch_s`: an until_stopped call's life before it is re-armed."""
        self._secret, self._poll_s, self._timeout_s = secret, poll_s, timeout_s
        self._watch_s, self.client = watch_s, uuid.uuid4().hex   # its id at every actor
        # process-wide: a context of its own would be terminated when the transport is garbage
        # collected, and zmq_ctx_term blocks while any frame it sent is still referenced
        self._context = zmq.Context.instance()
        self._peers: dict[str, _Peer] = {}
        self._alive: dict[str, tuple] = {}    # actor -> (its handle, its until_stopped task)
        # replies read while awaiting another on the same socket (a retry sent behind the other
        # micro-batch's call), kept by sequence until their `receive`; a sequence leaves
        # `_awaited` when read, lost, or when its `_Sent` is dropped unread (a failed step)
        self._early: dict[int, tuple[zmq.Frame, zmq.Frame]] = {}
        self._awaited: set[int] = set()
        self._seq = itertools.count()

    def __call__(self, layer: int, requests) -> list:
        return self.receive(self.send(layer, requests))

    def send(self, layer: int, requests) -> _Sent:
        """Send every request now; `receive` waits for the replies (so a caller can overlap
        other work with the round trip, e.g. the other micro-batch's attention)."""
        sent = _Sent(requests, [None] * len(requests), {})
        for i, (actor, x, counts) in enumerate(requests):
            key, seq = actor._actor_id.hex(), next(self._seq)
            try:
                peer = self._peer(key, actor)
                head = REQUEST.pack(seq, layer, x.shape[0], len(counts), DTYPES.index(x.dtype))
                peer.socket.send_multipart([head + struct.pack(f"<{len(counts)}i", *counts),
                                            as_bytes(x)], copy=False)
                sent.waiting[i] = (peer, key, seq)
                self._awaited.add(seq)
            except Exception as e:  # noqa: BLE001 - classified by the dispatcher
                self._drop(key)
                sent.results[i] = e if isinstance(e, (ray.exceptions.RayActorError,
                                                      ray.exceptions.ActorUnavailableError)) \
                    else PeerLost(f"channel to expert actor {key[:8]}: {e}")
        weakref.finalize(sent, self._forget, [seq for _, _, seq in sent.waiting.values()])
        return sent

    def receive(self, sent: _Sent) -> list:
        """The replies of `send`, in request order: (y, compute seconds) or an exception."""
        waiting, poller = dict(sent.waiting), zmq.Poller()
        for i, (peer, key, seq) in list(waiting.items()):
            if self._peers.get(key) is not peer:               # lost while we were away
                sent.results[i] = PeerLost(f"expert actor {key[:8]}: channel closed")
                del waiting[i]
            elif not self._take_early(sent, i, seq):
                poller.register(peer.socket, zmq.POLLIN)
            else:
                del waiting[i]
        deadline = time.monotonic() + self._timeout_s
        while waiting:
            ready = dict(poller.poll(self._poll_s * 1000))          # blocks: no busy polling
            for i, (peer, _key, seq) in list(waiting.items()):
                if peer.socket in ready and self._read(peer.socket, sent, i, seq):
                    del waiting[i]
                    poller.unregister(peer.socket)
            if not ready:
                self._check_lost(waiting, sent, poller, deadline)
        return sent.results

    def _read(self, socket: zmq.Socket, sent: _Sent, i: int, seq: int) -> bool:
        """Read one reply; True if it is the awaited one (another is kept for its caller)."""
        head, body = socket.recv_multipart(copy=False)
        got = REPLY.unpack_from(head.buffer)[0]
        if got != seq:
            if got in self._awaited:
                self._early[got] = (head, body)
            return False
        self._store(sent, i, head, body)
        self._awaited.discard(seq)
        return True

    def _take_early(self, sent: _Sent, i: int, seq: int) -> bool:
        frames = self._early.pop(seq, None)
        if frames is not None:
            self._store(sent, i, *frames)
            self._awaited.discard(seq)
        return frames is not None

    def _forget(self, seqs: list[int]) -> None:
        """A `_Sent` is gone: its replies, read or still to come, have no reader."""
        for seq in seqs:
            self._awaited.discard(seq)
            self._early.pop(seq, None)

    @staticmethod
    def _store(sent: _Sent, i: int, head: zmq.Frame, body: zmq.Frame) -> None:
        _, seconds, ok = REPLY.unpack_from(head.buffer)
        x = sent.requests[i][1]
        sent.results[i] = ((_as_rows(body, x.dtype, x.shape[0]), seconds) if ok
                           else ExpertError(bytes(body.buffer).decode()))

    def _check_lost(self, waiting: dict, sent: _Sent, poller: zmq.Poller, deadline: float) -> None:
        for i, (peer, key, _) in list(waiting.items()):
            lost = self._dead(key)
            if lost or time.monotonic() > deadline:
                why = "died" if lost else f"did not answer in {self._timeout_s} s"
                sent.results[i] = PeerLost(f"expert actor {key[:8]} {why}")
                poller.unregister(peer.socket)
                del waiting[i]
                self._drop(key)

    def connect(self, actor) -> None:
        """Open the channel to a new actor ahead of its first call (live scaling: before the
        dispatcher sends it rows). Safe beside a running step: it touches only this actor's
        entries."""
        self._peer(actor._actor_id.hex(), actor)

    def disconnect(self, actor) -> None:
        """Close the channel to an actor the dispatcher no longer uses (between steps)."""
        key = actor._actor_id.hex()
        self._drop(key)
        self._alive.pop(key, None)

    def _peer(self, key: str, actor) -> _Peer:
        if key not in self._peers:
            if key not in self._alive or ray.wait([self._alive[key][1]], timeout=0)[0]:
                self._watch(key, actor)                  # none, died, superseded or expired
            self._peers[key] = _Peer(self._context, actor, self._secret)
        return self._peers[key]

    def _watch(self, key: str, actor) -> None:
        self._alive[key] = actor, actor.until_stopped.remote(self.client, self._watch_s)

    def _dead(self, key: str) -> bool:
        """Whether the actor's until_stopped task failed (it died). One that returned (it
        expired after watch_s, or this client's newer call superseded it) is re-armed: the
        actor lived until then, and its next death fails the new call."""
        actor, watch = self._alive[key]
        ready, _ = ray.wait([watch], timeout=0)
        if not ready:
            return False
        try:
            ray.get(ready[0])
        except ray.exceptions.RayError:
            return True
        self._watch(key, actor)
        return False

    def _drop(self, key: str) -> None:
        peer = self._peers.pop(key, None)
        if peer is not None:
            peer.close()

    def close(self) -> None:
        for key in list(self._peers):
            self._drop(key)

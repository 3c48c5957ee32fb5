"""The expert's end of its channel (actors/experts/channel.py: the wire format and the frontend's
end): a ROUTER socket served by one daemon thread, which also answers ZeroMQ's authentication
(ZAP) requests and watches the socket's handshake failures.

    bound = CallBound.of(max_num_batched_tokens, cfg.num_experts_per_tok, len(expert_ids),
                         cfg.hidden_size, dtype)
    server = ChannelServer(worker.compute, host=node_ip, secret=secret, bound=bound)
    server.endpoint                      # "tcp://10.0.0.5:40123", given to the frontend
    server.stats                         # MergeStats (actors/info.py), cumulative

Merged calls (several frontends share one actor): the thread reads one request, then every
request already queued on the socket (at most MAX_MERGE, never waiting for more), and computes
the requests of one layer as ONE `compute` call, up to `bound.max_rows` rows (one call's bound,
so a merged GEMM is never larger than a lone one; the layer's requests past it go to the next
compute of the round, in order: `capped`): rows of each expert id concatenated in the
order the requests were read (a's rows for expert_ids[0], b's for expert_ids[0], a's for
expert_ids[1], ...), counts summed; y is split back into each request's own order, and each
gets its own reply. Each reply's compute seconds are the merged call's seconds times its share
of the rows (equal shares when there are none). A failed compute fails every request of its
merge. A lone request is computed as it came (no copy). `stats` counts requests, computes,
merged requests and rows.

Bounds: a call carries at most `bound.max_rows` rows: a step's tokens (the engine's
max_num_batched_tokens) times the expert ids of this actor one token can pick (min(k, top-k)).
ZeroMQ's maxmsgsize is set to the largest legitimate frame (max_rows x D x dtype bytes, or the
header if larger): it holds per frame, for every peer, authenticated or not, and a peer whose
frame header announces more is disconnected before the body is read.
Refusals: a peer with a wrong secret (ZAP answers 400) or none (a mechanism mismatch, which
never reaches ZAP) gets one WARNING line naming the reason (and the address ZAP saw); the
secret, right or wrong, is never logged.
Rows may come in any float dtype of the protocol (channel.py DTYPES): the actor computes them
in its own and answers in theirs, so a frontend whose `dtype: auto` chose another compute dtype
(a CPU with or without native bf16, model/linear.py `native_dtype`) is still served.
Malformed calls from an authenticated peer (wrong frame count, short header, an unknown dtype
code, k other than its expert ids, rows not n x D, n over the bound, bad counts) get an
error reply (ExpertError at the frontend: not retriable) and one WARNING line; the thread goes on
serving. Anything else that ends the thread (a BaseException from `compute`, a ZeroMQ error)
calls `on_death`, by default logging and exiting the process: the actor then fails Ray's
liveness (its until_stopped call fails), the dispatcher re-sends, Ray restarts the actor.
"""
from __future__ import annotations

import dataclasses
import hmac
import logging
import os
import struct
import threading
from collections.abc import Callable

import torch
import zmq
from zmq.utils.monitor import parse_monitor_message

from actors.experts.channel import DTYPES, REPLY, REQUEST, USER, Compute, as_bytes
from actors.info import MergeStats

log = logging.getLogger(__name__)

NO_SEQ = 2 ** 64 - 1            # the reply's sequence when the request had none: nobody waits on it
ZAP_ENDPOINT = "inproc://zeromq.zap.01"       # fixed by ZeroMQ's RFC 27 (ZAP), one per context
# handshakes that fail before ZAP is asked, by monitor event (ZAP logs its own refusals)
REFUSED = {zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol error in the handshake",
           zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake failed"}
MECHANISM_MISMATCH = "no secret (it offered another mechanism than PLAIN)"
MAX_MERGE = 64                  # requests read in one round at most (then ZAP gets its turn)


class MalformedCall(ValueError):
    """A request's frames do not form a call this actor takes; `seq` is its sequence if read."""

    def __init__(self, seq: int | None, why: str):
        super().__init__(why)
        self.seq = seq


@dataclasses.dataclass(frozen=True)
class CallBound:
    """The largest legitimate call an expert actor takes, and the checks of a request."""
    max_rows: int            # n of one call at most
    hidden_size: int         # D
    dtype: torch.dtype       # the actor's: rows in another are converted to it and back
    num_experts: int         # k, the expert ids the actor holds (counts in the header)

    @classmethod
    def of(cls, max_tokens: int, top_k: int, num_experts: int, hidden_size: int,
           dtype: torch.dtype) -> CallBound:
        """A step's `max_tokens` routed to `top_k` distinct experts each: one actor holding
        `num_experts` ids gets at most max_tokens x min(num_experts, top_k) rows."""
        return cls(max_tokens * min(num_experts, top_k), hidden_size, dtype, num_experts)

    @property
    def max_frame_bytes(self) -> int:
        """ZeroMQ's maxmsgsize: the rows frame of max_rows, or the header if larger."""
        return max(self.max_rows * self.hidden_size * max(d.itemsize for d in DTYPES),
                   REQUEST.size + 4 * self.num_experts)

    def parse(self, frames: list) -> tuple[int, int, torch.Tensor, list[int], torch.dtype]:
        """A request's frames (header, rows: bytes or zmq.Frame) -> (sequence, layer,
        x (n, D) in the actor's dtype (viewing the rows frame when it is the rows' dtype),
        counts (k,), the rows' dtype). MalformedCall naming what is wrong."""
        head = memoryview(frames[0]) if frames else memoryview(b"")
        seq = struct.unpack_from("<Q", head)[0] if len(head) >= 8 else None
        if len(frames) != 2:
            raise MalformedCall(seq, f"a request is 2 frames (header, rows), got {len(frames)}")
        if len(head) < REQUEST.size:
            raise MalformedCall(seq, f"header of {len(head)} bytes, under {REQUEST.size}")
        seq, layer, n, k, code = REQUEST.unpack_from(head)
        if k != self.num_experts or len(head) != REQUEST.size + 4 * k:
            raise MalformedCall(seq, f"header of {len(head)} bytes with k={k}: this actor holds "
                                     f"{self.num_experts} expert ids")
        if code >= len(DTYPES):
            raise MalformedCall(seq, f"dtype code {code}: expected one of 0..{len(DTYPES) - 1} "
                                     f"({', '.join(map(str, DTYPES))})")
        dtype = DTYPES[code]
        if n > self.max_rows:
            raise MalformedCall(seq, f"n={n} rows, over this actor's bound of {self.max_rows}")
        row = self.hidden_size * dtype.itemsize
        rows = memoryview(frames[1])
        if rows.nbytes != n * row:
            raise MalformedCall(seq, f"rows frame of {rows.nbytes} bytes, not n={n} x {row}")
        counts = list(struct.unpack_from(f"<{k}i", head, REQUEST.size))
        if min(counts, default=0) < 0 or sum(counts) != n:
            raise MalformedCall(seq, f"counts {counts} must be >= 0 and sum to n={n}")
        return seq, layer, self._rows(rows, n, dtype).to(self.dtype), counts, dtype

    def _rows(self, rows: memoryview, n: int, dtype: torch.dtype) -> torch.Tensor:
        if n == 0:
            return torch.empty(0, self.hidden_size, dtype=dtype)
        return torch.frombuffer(rows, dtype=torch.uint8).view(dtype).view(n, -1)  # (n, D)


@dataclasses.dataclass(frozen=True)
class Request:
    """One parsed call: who sent it, its sequence, layer, rows x (n, D) and counts (k,)."""
    peer: zmq.Frame
    seq: int
    layer: int
    x: torch.Tensor
    counts: list[int]
    dtype: torch.dtype          # the rows' as sent, which the reply takes


def merge_rows(requests: list[Request]) -> tuple[torch.Tensor, list[int]]:
    """Several requests' rows as one call: for each expert id in turn, every request's rows for
    it in request order -> (x (sum n, D), counts (k,) summed)."""
    pieces = [r.x.split(r.counts) for r in requests]           # [request][expert] (n_re, D)
    k = len(requests[0].counts)
    x = torch.cat([p[e] for e in range(k) for p in pieces])     # (sum n, D)
    return x, [sum(r.counts[e] for r in requests) for e in range(k)]


def capped(requests: list[Request], max_rows: int) -> list[list[Request]]:
    """Requests of one layer, in order -> consecutive groups of at most `max_rows` rows each,
    each as full as the order allows (a request alone is never over: `CallBound.parse` bounds it).
    Rows n [5, 5, 5, 12, 0] with max_rows 12 -> [[5, 5], [5], [12, 0]]."""
    groups: list[list[Request]] = []
    total = 0
    for r in requests:
        n = r.x.shape[0]
        if groups and total + n <= max_rows:
            groups[-1].append(r)
            total += n
        else:
            groups.append([r])
            total = n
    return groups


def split_rows(y: torch.Tensor, requests: list[Request]) -> list[torch.Tensor]:
    """merge_rows' inverse on the merged output y (sum n, D) -> each request's y (n, D), in its
    own expert order (views when a request's rows are one block)."""
    k, m = len(requests[0].counts), len(requests)
    pieces = y.split([r.counts[e] for e in range(k) for r in requests])   # [expert][request]
    out = []
    for i in range(m):
        own = [pieces[e * m + i] for e in range(k)]
        out.append(own[0] if k == 1 else torch.cat(own))
    return out


def exit_process() -> None:
    """The channel thread died: end the process, so Ray sees the actor die and restarts it."""
    logging.shutdown()
    os._exit(70)                # EX_SOFTWARE; sys.exit would end only this thread


class ChannelServer:
    """Serves `compute` on a ROUTER socket from a daemon thread; one per expert actor process.
    `on_death()` runs if that thread ends (see the module doc); tests pass their own."""

    def __init__(self, compute: Compute, host: str, secret: str, bound: CallBound,
                 on_death: Callable[[], None] = exit_process):
        self._compute, self._secret, self.bound = compute, secret.encode(), bound
        self._on_death = on_death
        self.stats = MergeStats()     # replaced whole by the thread: a reader sees one version
        # its own context, kept for the process's life (the thread holds this object): ZAP's
        # endpoint is one per context, and the context is never terminated under the socket
        self._context = zmq.Context()
        self._zap = self._context.socket(zmq.REP)
        self._zap.linger = 0
        self._zap.bind(ZAP_ENDPOINT)                  # before any handshake asks it
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.plain_server = True
        self._socket.linger = 0
        self._socket.maxmsgsize = bound.max_frame_bytes
        self._monitor = self._socket.get_monitor_socket(sum(REFUSED))
        port = self._socket.bind_to_random_port(f"tcp://{host}")
        self.endpoint = f"tcp://{host}:{port}"
        self.thread = threading.Thread(target=self._run, name="expert-channel", daemon=True)
        self.thread.start()
        log.info("expert channel listening on %s (frames up to %d bytes)", self.endpoint,
                 bound.max_frame_bytes)

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException:
            log.critical("expert channel on %s died: this actor can serve no call",
                         self.endpoint, exc_info=True)
            self._on_death()

    def _serve(self) -> None:
        poller = zmq.Poller()
        handlers = {self._socket: self._call, self._zap: self._authenticate,
                    self._monitor: self._refused}
        for socket in handlers:
            poller.register(socket, zmq.POLLIN)
        while True:
            for socket, _ in poller.poll():              # blocks: an idle channel uses no CPU
                handlers[socket]()

    def _call(self) -> None:
        """One round: the first request, every one queued behind it, each layer's computed in as
        few calls of at most `bound.max_rows` rows as their order allows."""
        by_layer: dict[int, list[Request]] = {}
        for request in self._read_round():
            by_layer.setdefault(request.layer, []).append(request)
        for requests in by_layer.values():
            for group in capped(requests, self.bound.max_rows):
                self._compute_layer(group)

    def _read_round(self) -> list[Request]:
        """The request that woke the thread, then those already queued (no wait; MAX_MERGE in
        all); a malformed one is answered with its error here and left out."""
        requests = []
        for i in range(MAX_MERGE):
            try:
                peer, *frames = self._socket.recv_multipart(zmq.NOBLOCK if i else 0, copy=False)
            except zmq.Again:
                break
            try:
                requests.append(Request(peer, *self.bound.parse(frames)))
            except MalformedCall as e:
                log.warning("channel %s: malformed call answered with an error: %s",
                            self.endpoint, e)
                self._reply(peer, e.seq, f"MalformedCall: {e}")
        return requests

    def _compute_layer(self, requests: list[Request]) -> None:
        """Compute the requests of one layer as one call and reply to each."""
        layer, merged = requests[0].layer, len(requests) > 1
        x, counts = merge_rows(requests) if merged else (requests[0].x, requests[0].counts)
        self.stats += MergeStats(len(requests), 1, len(requests) if merged else 0, x.shape[0])
        try:
            y, seconds = self._compute(layer, x, counts)
        except Exception as e:  # noqa: BLE001 - reported to the callers, who fail the step
            log.warning("expert compute failed (layer %d, %d request(s)): %s: %s", layer,
                        len(requests), type(e).__name__, e)
            for r in requests:
                self._reply(r.peer, r.seq, f"{type(e).__name__}: {e}")
            return
        for r, own in zip(requests, split_rows(y, requests) if merged else [y]):
            share = r.x.shape[0] / x.shape[0] if x.shape[0] else 1 / len(requests)
            self._socket.send_multipart([r.peer, REPLY.pack(r.seq, seconds * share, 1),
                                         as_bytes(own.to(r.dtype))], copy=False)

    def _reply(self, peer: zmq.Frame, seq: int | None, error: str) -> None:
        head = REPLY.pack(NO_SEQ if seq is None else seq, 0.0, 0)
        self._socket.send_multipart([peer, head, error.encode()], copy=False)

    def _authenticate(self) -> None:
        """One ZAP request (RFC 27: version, request id, domain, address, identity, mechanism,
        credentials...) -> 200 for PLAIN with our user and secret, else 400, logged."""
        request = self._zap.recv_multipart()
        request += [b""] * (8 - len(request))
        _, request_id, _, address, _, mechanism, user, password = request[:8]
        ok = (mechanism == b"PLAIN" and user == USER
              and hmac.compare_digest(password, self._secret))
        if not ok:
            log.warning("channel %s: refused a peer from %s: wrong user or secret (%s)",
                        self.endpoint, address.decode(errors="replace") or "?",
                        mechanism.decode(errors="replace"))
        self._zap.send_multipart([b"1.0", request_id, b"200" if ok else b"400",
                                  b"OK" if ok else b"refused", USER if ok else b"", b""])

    def _refused(self) -> None:
        """A handshake that failed before ZAP (a peer without a secret offers NULL)."""
        event = parse_monitor_message(self._monitor.recv_multipart())
        code = int(event["value"])          # a ZMTP protocol error, or an errno
        why = (MECHANISM_MISMATCH if code == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
               else f"{REFUSED[event['event']]} (code {code:#x})")
        log.warning("channel %s: refused a peer: %s", self.endpoint, why)

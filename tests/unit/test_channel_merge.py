"""Merged calls in actors/experts/channel_server.py, without Ray: requests of one layer waiting on
the socket when the expert starts computing are computed as one call (rows of each expert id
concatenated in request order, results split back) of at most one call's rows (the rest in the
next compute), with exact results per request, exact MergeStats, layers kept apart, and a
malformed or failing request failing nobody else."""
from __future__ import annotations

import itertools
import struct
import threading
import time

import numpy as np
import pytest
import torch
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.experts.channel import DTYPES, REPLY, REQUEST, USER
from actors.experts.channel_server import (
    CallBound,
    ChannelServer,
    Request,
    capped,
    merge_rows,
    split_rows,
)
from actors.info import MergeStats

SECRET = "merge-" + "y" * 58
D, K, PER_CALL = 8, 2, 12                # hidden size; expert ids per actor; rows a call at most
HOLD, FAILS = 0, 99                      # layers: the first call blocks; every call fails
SECONDS = 1.0                            # each compute's reported time


def expertwise(layer: int, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """A stand-in expert whose output depends on the expert id of each row: misplaced rows show."""
    return torch.cat([part * (e + 1) + layer for e, part in enumerate(x.split(counts))])


class HeldCompute:
    """`compute` for the server: records each call; a call of layer HOLD blocks until released
    (so requests queue behind it); layer FAILS raises."""

    def __init__(self):
        self.calls: list[tuple[int, torch.Tensor, list[int]]] = []
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, layer, x, counts):
        self.calls.append((layer, x.clone(), list(counts)))
        if layer == HOLD:
            self.entered.set()
            assert self.release.wait(10), "never released"
        if layer == FAILS:
            raise ValueError("layer 99 does not exist")
        return expertwise(layer, x, counts), SECONDS


def rows(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def frames(seq: int, layer: int, x: torch.Tensor, counts: list[int]) -> list[bytes]:
    head = (REQUEST.pack(seq, layer, x.shape[0], len(counts), DTYPES.index(x.dtype))
            + struct.pack(f"<{len(counts)}i", *counts))
    return [head, x.contiguous().view(torch.uint8).numpy().tobytes()]


# ---- merge_rows / split_rows: pure ---------------------------------------------------------
counts_st = st.lists(st.integers(0, 5), min_size=K, max_size=K)


@settings(max_examples=200, deadline=None)
@given(st.lists(counts_st, min_size=1, max_size=4), st.integers(1, 9))
def test_merged_rows_are_grouped_by_expert_and_split_back_exactly(counts, layer):
    requests = [Request(None, i, layer, rows(sum(c), i), c, torch.float32)
                for i, c in enumerate(counts)]
    x, merged_counts = merge_rows(requests)
    assert merged_counts == [sum(c[e] for c in counts) for e in range(K)]
    want_x = torch.cat([r.x.split(r.counts)[e] for e in range(K) for r in requests])
    assert torch.equal(x, want_x)
    ys = split_rows(expertwise(layer, x, merged_counts), requests)
    for r, y in zip(requests, ys, strict=True):
        assert torch.equal(y, expertwise(layer, r.x, r.counts))


# ---- a real server and three clients ---------------------------------------------------------
@pytest.fixture(scope="module")
def held():
    return HeldCompute()


@pytest.fixture(scope="module")
def server(held):
    died = threading.Event()
    yield ChannelServer(held, "127.0.0.1", SECRET, CallBound(PER_CALL, D, torch.float32, K),
                        on_death=died.set)
    assert not died.is_set(), "the channel's thread died"


@pytest.fixture(scope="module")
def clients(server):
    socks = []
    for _ in range(3):
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.linger = 0
        sock.plain_username, sock.plain_password = USER, SECRET.encode()
        sock.connect(server.endpoint)
        socks.append(sock)
    yield socks
    for sock in socks:
        sock.close(linger=0)


def as_rows(body: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(body, dtype=np.float32).copy()).view(-1, D)


def replies(sock: zmq.Socket, n: int) -> dict[int, tuple[float, int, bytes]]:
    """`n` replies on `sock` -> sequence -> (seconds, ok, body)."""
    out = {}
    for _ in range(n):
        assert sock.poll(10_000), "no reply"
        head, body = sock.recv_multipart()
        seq, seconds, ok = REPLY.unpack(head)
        out[seq] = (seconds, ok, body)
    return out


def held_round(held, clients, sends: list[tuple[int, list[bytes]]]) -> list[dict]:
    """Block the server in a HOLD call from client 0, queue `sends` (client, frames) behind it,
    release -> each client's replies (sequence -> ...), the HOLD one left out."""
    held.calls.clear()
    held.entered.clear()
    held.release.clear()
    clients[0].send_multipart(frames(0, HOLD, rows(1, 0), [1, 0]))
    assert held.entered.wait(10)
    for client, message in sends:
        clients[client].send_multipart(message)
    time.sleep(0.3)                     # every request reaches the server's socket meanwhile
    held.release.set()
    expected = [sum(c == i for c, _ in sends) + (i == 0) for i in range(len(clients))]
    got = [replies(sock, n) for sock, n in zip(clients, expected)]
    del got[0][0]                       # the HOLD call's
    return got


call_st = st.tuples(st.integers(0, 2), st.sampled_from([1, 2, FAILS]),
                    st.lists(st.integers(0, PER_CALL // K), min_size=K, max_size=K))


@settings(max_examples=12, deadline=None)
@given(st.lists(call_st, min_size=2, max_size=6), st.booleans())
def test_calls_waiting_together_are_merged_per_layer_up_to_the_bound(held, server, clients, calls,
                                                            malformed):
    xs = [rows(sum(c), 10 + i) for i, (_, _, c) in enumerate(calls)]
    sends = [(client, frames(100 + i, layer, xs[i], c))
             for i, (client, layer, c) in enumerate(calls)]
    if malformed:                                       # counts not summing to n
        sends.insert(1, (1, frames(99, 1, rows(2, 1), [1, 0])))
    before = server.stats
    got = held_round(held, clients, sends)
    by_seq = {seq: reply for per_client in got for seq, reply in per_client.items()}

    layers = {}                                         # layer -> indices, in first-seen order
    for i, (_, layer, _) in enumerate(calls):
        layers.setdefault(layer, []).append(i)
    order = [c[0] for c in held.calls[1:]]
    assert held.calls[0][0] == HOLD and sorted(set(order)) == sorted(layers)
    assert 1 + sum(a != b for a, b in zip(order, order[1:])) == len(layers)  # layer by layer
    groups = {layer: merged_groups(computed(held, layer), members, xs, calls)
              for layer, members in layers.items()}
    for layer, layer_groups in groups.items():
        for group in layer_groups:
            total = sum(xs[i].shape[0] for i in group)
            assert total <= PER_CALL or len(group) == 1, (layer, group)   # one call's bound
            for i in group:
                seconds, ok, body = by_seq[100 + i]
                if layer == FAILS:
                    assert not ok and b"layer 99 does not exist" in body
                    continue
                y = as_rows(body)
                assert ok and torch.equal(y, expertwise(layer, xs[i], calls[i][2]))
                share = xs[i].shape[0] / total if total else 1 / len(group)
                assert seconds == pytest.approx(SECONDS * share)
    if malformed:
        assert not by_seq[99][1] and by_seq[99][2].startswith(b"MalformedCall: ")

    all_groups = [g for layer_groups in groups.values() for g in layer_groups]
    assert server.stats == before + MergeStats(
        calls=1 + len(calls), computes=1 + len(all_groups),
        merged_calls=sum(len(g) for g in all_groups if len(g) > 1),
        rows=1 + sum(x.shape[0] for x in xs))


def computed(held, layer: int) -> list[tuple[torch.Tensor, list[int]]]:
    """The compute calls of `layer` after the HOLD one -> (x, counts) each, in call order."""
    return [(x, counts) for lay, x, counts in held.calls[1:] if lay == layer]


def greedy(order: list[int], n: list[int]) -> list[list[int]]:
    """The oracle of the cap: requests in `order` (rows n[i]) -> consecutive groups, a request
    joining the current group while its rows stay within PER_CALL."""
    groups = []
    for i in order:
        if groups and sum(n[j] for j in groups[-1]) + n[i] <= PER_CALL:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def merged_groups(computes, members: list[int], xs, calls) -> list[list[int]]:
    """The computes of one layer got its requests' rows, expert by expert, grouped greedily up to
    PER_CALL rows, the requests in one order (the order the server read them: each client's in
    its send order, fair queueing across clients decides the rest) -> those groups."""
    n = {i: xs[i].shape[0] for i in members}
    for order in itertools.permutations(members):
        clients = [calls[i][0] for i in order]
        if any(sorted(j for j, c in zip(order, clients) if c == client) !=
               [j for j, c in zip(order, clients) if c == client] for client in set(clients)):
            continue                                    # a client's calls are read in order
        groups = greedy(list(order), n)
        if len(groups) == len(computes) and all(
                counts == [sum(calls[i][2][e] for i in g) for e in range(K)]
                and torch.equal(x, torch.cat([xs[i].split(calls[i][2])[e]
                                              for e in range(K) for i in g]))
                for g, (x, counts) in zip(groups, computes)):
            return groups
    raise AssertionError(f"the computes {[c for _, c in computes]} are not requests {members} "
                         f"grouped greedily up to {PER_CALL} rows in any read order")


def test_a_merged_compute_never_exceeds_one_calls_bound(held, server, clients):
    """Three full calls and a lone-size pair of one layer waiting together: each full call is a
    compute of its own (3 x PER_CALL rows merged would be over the bound), the rest are merged
    in order up to the bound."""
    half = [PER_CALL // 4, PER_CALL // 4]                # PER_CALL / 2 rows
    sizes = [[PER_CALL // K] * K] * 3 + [half, half, half]
    xs = [rows(sum(c), 40 + i) for i, c in enumerate(sizes)]
    before = server.stats
    got = held_round(held, clients, [(1, frames(200 + i, 3, x, c))
                                     for i, (x, c) in enumerate(zip(xs, sizes))])
    assert [x.shape[0] for _, x, _ in held.calls[1:]] == [PER_CALL] * 4 + [PER_CALL // 2]
    for i, (x, c) in enumerate(zip(xs, sizes)):
        seconds, ok, body = got[1][200 + i]
        assert ok and torch.equal(as_rows(body), expertwise(3, x, c))
        assert seconds == pytest.approx(SECONDS if i < 3 or i == 5 else SECONDS / 2)
    assert server.stats == before + MergeStats(calls=7, computes=6, merged_calls=2,
                                               rows=1 + 4 * PER_CALL + PER_CALL // 2)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, PER_CALL), max_size=12))
def test_capped_groups_are_in_order_full_and_within_the_bound(n):
    requests = [Request(None, i, 1, rows(k, i), [k, 0], torch.float32) for i, k in enumerate(n)]
    groups = capped(requests, PER_CALL)
    assert [r.seq for g in groups for r in g] == list(range(len(n)))      # in order, each once
    assert [[r.seq for r in g] for g in groups] == greedy(range(len(n)), n)
    for g, after in zip(groups, groups[1:]):
        assert sum(r.x.shape[0] for r in g) + after[0].x.shape[0] > PER_CALL   # none fits more
    assert all(sum(r.x.shape[0] for r in g) <= PER_CALL for g in groups)


def test_a_lone_call_is_not_counted_as_merged(held, server, clients):
    before = server.stats
    x = rows(5, 3)
    got = held_round(held, clients, [(1, frames(7, 2, x, [2, 3]))])
    seconds, ok, body = got[1][7]
    assert ok and seconds == SECONDS
    assert torch.equal(as_rows(body),
                       expertwise(2, x, [2, 3]))
    assert server.stats == before + MergeStats(calls=2, computes=2, merged_calls=0, rows=6)
    assert server.stats.rows_per_compute == server.stats.rows / server.stats.computes


def test_merge_stats_sum():
    a, b = MergeStats(3, 2, 2, 10), MergeStats(1, 1, 0, 4)
    assert a + b == MergeStats(4, 3, 2, 14) == MergeStats.merged([a, b])
    assert MergeStats.merged([]) == MergeStats() and MergeStats().rows_per_compute == 0.0
    assert (a + b).rows_per_compute == 14 / 3

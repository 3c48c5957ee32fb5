"""The transport seam: how a layer's rows reach the expert actors and come back.

    transport = make_transport("channel", secret)       # or "object_refs"
    results = transport(layer, [(actor, x_rows, counts), ...])   # one per actor, same order

A transport takes one request per actor (its handle, its rows `x (n, D)` sorted by expert, and
the rows per expert id it holds) and returns, in the same order, `(y (n, D), compute seconds)`
or the exception that call failed with (returned, not raised: the dispatcher decides what to
re-send; actors/experts/dispatcher.py). Two implementations, selectable per engine
(EngineOptions.transport): a persistent ZeroMQ channel per actor (actors/experts/channel.py,
the default: no Ray task per layer) and Ray object refs (a `compute.remote` per actor per
layer: the equality oracle).
"""
from __future__ import annotations

from collections.abc import Callable

import ray
import torch

from actors.experts.channel import ChannelTransport

TRANSPORTS = ("channel", "object_refs")

Result = tuple[torch.Tensor, float]    # (y rows, seconds the actor spent computing)
Transport = Callable[[int, list[tuple[object, torch.Tensor, list[int]]]],
                     list["Result | Exception"]]


class ObjectRefTransport:
    """One `compute.remote` per actor (`send`), then wait for all (`receive`); a failure is
    returned, not raised. A Ray task per actor per layer: the equality oracle."""

    def __call__(self, layer: int, requests) -> list[Result | Exception]:
        return self.receive(self.send(layer, requests))

    @staticmethod
    def send(layer: int, requests) -> list:
        return [actor.compute.remote(layer, x, counts) for actor, x, counts in requests]

    @staticmethod
    def receive(refs: list) -> list[Result | Exception]:
        results: list[Result | Exception] = []
        for ref in refs:
            try:
                results.append(ray.get(ref))
            except Exception as e:  # noqa: BLE001 - classified by the caller
                results.append(e)
        return results


def make_transport(name: str, secret: str | None = None) -> Transport:
    """"channel" (needs the engine's secret) or "object_refs"; ValueError naming the field."""
    if name == "object_refs":
        return ObjectRefTransport()
    if name == "channel" and secret:
        return ChannelTransport(secret)
    raise ValueError(f"transport must be one of {TRANSPORTS} (channel with a secret), got {name!r}")

"""The link model: how long a message of ``n`` bytes takes to cross a link.

A link has a one-way latency and a bandwidth; a message of ``n`` bytes arrives
``latency + n * 8 / bandwidth`` seconds after it is sent (:meth:`LinkSpec.delay_s`). On one machine
there is no network to pay that cost, so the receiver pays it itself before it handles the message:
a Ray actor awaits ``asyncio.sleep(link.delay_s(n))`` (``specmesh.actors.remote``), and the
in-process backend and the driver receiving a verdict block in :func:`sleep_for`. Each message pays
its own delay; the model does not queue messages that share a link (a round sends one message per
hop). On a real cluster the network pays the cost and the model stays off, unless a user asks for it
to emulate a slower network (see :func:`emulated`).

Nothing here knows Ray, the topology file or the wire codec: callers pass the link and the encoded size.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

BITS_PER_BYTE = 8
BITS_PER_MEGABIT = 1_000_000  # network megabits are decimal: 10 Mbit/s = 10**7 bit/s
MS_PER_S = 1000.0

# How much of a link the application emulates (the ``emulate`` key of a topology file's [link_model]).
EMULATE_AUTO = "auto"  # all of it on one machine, none of it on a real network
EMULATE_ON = "on"  # all of it, everywhere (emulate a slower net on a real cluster too)
EMULATE_OFF = "off"  # none of it
EMULATE_LATENCY = "latency"  # the latency only; the bandwidth comes from the kernel (e.g. ``tc tbf``)
EMULATE_MODES = (EMULATE_AUTO, EMULATE_ON, EMULATE_OFF, EMULATE_LATENCY)


@dataclass(frozen=True)
class LinkSpec:
    """One direction of a link.

    The default is an ideal link (no latency, unlimited bandwidth): two workers on the same node.
    """

    latency_ms: float = 0.0  # one-way propagation delay, milliseconds, finite and >= 0
    bandwidth_mbps: float = math.inf  # megabits (10**6 bits) per second, > 0; inf = unlimited

    def __post_init__(self) -> None:
        if not isinstance(self.latency_ms, (int, float)) or isinstance(self.latency_ms, bool):
            raise TypeError(f"latency_ms = {self.latency_ms!r}: must be a number of milliseconds")
        if not isinstance(self.bandwidth_mbps, (int, float)) or isinstance(self.bandwidth_mbps, bool):
            raise TypeError(f"bandwidth_mbps = {self.bandwidth_mbps!r}: must be a number of Mbit/s")
        if not (math.isfinite(self.latency_ms) and self.latency_ms >= 0):
            raise ValueError(f"latency_ms = {self.latency_ms!r}: must be finite and >= 0")
        if math.isnan(self.bandwidth_mbps) or self.bandwidth_mbps <= 0:
            raise ValueError(f"bandwidth_mbps = {self.bandwidth_mbps!r}: must be > 0 (inf = unlimited)")

    @property
    def is_ideal(self) -> bool:
        """True when every message crosses this link instantly."""
        return self.latency_ms == 0 and math.isinf(self.bandwidth_mbps)

    def transfer_s(self, nbytes: int) -> float:
        """Seconds to push ``nbytes`` onto the link (the bandwidth part of the delay)."""
        if nbytes < 0:
            raise ValueError(f"nbytes = {nbytes!r}: must be >= 0")
        return nbytes * BITS_PER_BYTE / (self.bandwidth_mbps * BITS_PER_MEGABIT)

    def delay_s(self, nbytes: int) -> float:
        """Seconds from sending ``nbytes`` to their arrival: ``latency + bytes * 8 / bandwidth``."""
        return self.latency_ms / MS_PER_S + self.transfer_s(nbytes)

    def latency_only(self) -> LinkSpec:
        """This link with unlimited bandwidth (for when the kernel shapes the bandwidth)."""
        return LinkSpec(latency_ms=self.latency_ms)


IDEAL = LinkSpec()  # same node, or emulation off


def emulated(link: LinkSpec, mode: str, real_network: bool) -> LinkSpec:
    """The part of ``link`` that the application must add itself, by the topology's ``emulate`` mode.

    Args:
        link: the link as the topology describes it.
        mode: one of ``EMULATE_MODES``: ``auto`` (all on one machine, nothing on a real network),
            ``on`` (all), ``off`` (nothing), ``latency`` (latency only; bandwidth from ``tc``).
        real_network: True when messages cross a real network (the ``cluster`` backend).

    Returns:
        The link whose delay the receiver sleeps (:func:`sleep_for`, ``delay_s``); ``IDEAL`` when
            nothing is emulated.
    """
    if mode == EMULATE_AUTO:
        return IDEAL if real_network else link
    if mode == EMULATE_ON:
        return link
    if mode == EMULATE_OFF:
        return IDEAL
    if mode == EMULATE_LATENCY:
        return link.latency_only()
    raise ValueError(f"emulate = {mode!r}: must be one of {', '.join(EMULATE_MODES)}")


def sleep_for(link: LinkSpec, nbytes: int) -> float:
    """Block for the modelled time ``nbytes`` take to cross ``link`` (the in-process backend, the driver).

    Args:
        link: the emulated link (see :func:`emulated`); an ideal link returns at once, with no sleep.
        nbytes: size of the encoded message.

    Returns:
        The seconds slept: ``link.delay_s(nbytes)``.
    """
    if link.is_ideal:
        return 0.0
    wait = link.delay_s(nbytes)
    time.sleep(wait)
    return wait

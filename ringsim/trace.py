"""The trace: every send, receive, compute, merge and skip of a ring run, with fixed fields.

Each rank records its own events in program order (:class:`RankTrace`); :class:`Trace` puts
the ranks together in a deterministic order, ``(step, rank, sequence)``, so two runs of one
configuration — simulated or under MPI — give equal traces.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from ringsim.config import DilatedConfig, kv_heads, kv_ratio


class TraceAction(str, Enum):
    SEND = "send"
    RECV = "recv"
    COMPUTE = "compute"
    MERGE = "merge"
    SKIP = "skip"


@dataclass(frozen=True)
class Event:
    """One thing one rank did at one step.

    ``peer`` is the other rank of a send/recv (None otherwise); ``nbytes`` the payload bytes
    moved; ``pair`` and ``subring`` name the pattern pair and segment sub-ring; ``source_rank``
    is whose K/V block the event concerns; ``rows`` are global positions per pattern group:
    the K/V rows moved (sends, receives) or the query rows attended (computes); ``detail`` is
    the block actions, per pattern group (the gradient relay's messages: what travels);
    ``pairs`` is the number of (query, key) scores a compute made, over all its heads.
    """

    step: int
    rank: int
    action: TraceAction
    peer: int | None = None
    nbytes: int = 0
    pair: int | None = None
    subring: int | None = None
    source_rank: int | None = None
    rows: tuple[range, ...] = ()
    detail: str = ""
    pairs: int = 0


@dataclass
class RankTrace:
    """One rank's event log and its memory meter (bytes of arrays held)."""

    rank: int
    events: list[Event] = field(default_factory=list)
    held: dict[str, int] = field(default_factory=dict)
    peak_bytes: int = 0

    def add(self, event: Event) -> None:
        self.events.append(event)

    def hold(self, name: str, nbytes: int) -> None:
        """Count ``nbytes`` of arrays as held under ``name`` (replacing what it held)."""
        self.held[name] = nbytes
        self.peak_bytes = max(self.peak_bytes, sum(self.held.values()))


@dataclass(frozen=True)
class Trace:
    """The events of all ranks, ordered by ``(step, rank)``, and each rank's peak bytes."""

    world_size: int
    events: tuple[Event, ...]
    peak_bytes: tuple[int, ...]

    @classmethod
    def from_ranks(cls, ranks: Sequence[RankTrace]) -> Trace:
        ordered = sorted(ranks, key=lambda r: r.rank)
        keyed = [((e.step, r.rank, i), e) for r in ordered for i, e in enumerate(r.events)]
        events = tuple(e for _, e in sorted(keyed, key=lambda item: item[0]))
        return cls(len(ordered), events, tuple(r.peak_bytes for r in ordered))

    def to_json(self) -> dict:
        """A JSON-ready dict (ranges as ``[start, stop, step]``); inverse of :meth:`from_json`."""
        events = [
            {
                **e.__dict__,
                "action": e.action.value,
                "rows": [[r.start, r.stop, r.step] for r in e.rows],
            }
            for e in self.events
        ]
        return {
            "world_size": self.world_size,
            "peak_bytes": list(self.peak_bytes),
            "events": events,
        }

    @classmethod
    def from_json(cls, data: dict) -> Trace:
        events = tuple(
            Event(
                **{
                    **e,
                    "action": TraceAction(e["action"]),
                    "rows": tuple(range(*r) for r in e["rows"]),
                }
            )
            for e in data["events"]
        )
        return cls(data["world_size"], events, tuple(data["peak_bytes"]))

    def select(
        self, action: TraceAction | str | None = None, rank: int | None = None
    ) -> list[Event]:
        """Events of one action and/or one rank (a rank the run did not have raises
        ``ValueError``: it would otherwise read as a rank that did nothing)."""
        if rank is not None and not (
            isinstance(rank, numbers.Integral) and 0 <= rank < self.world_size
        ):
            raise ValueError(f"rank: the trace has ranks 0..{self.world_size - 1}, got {rank!r}")
        return [
            e
            for e in self.events
            if (action is None or e.action == TraceAction(action))
            and (rank is None or e.rank == rank)
        ]

    def sent_bytes(self, rank: int, grads: bool | None = None) -> int:
        """Payload bytes of the arrays ``rank`` sent (elements x itemsize, spec §6).

        ``grads``: None counts every message; False only K/V, True only the dK/dV of a
        backward run (events whose detail starts with ``"dk"``).
        """
        return sum(
            e.nbytes
            for e in self.select(TraceAction.SEND, rank)
            if grads is None or grads == e.detail.startswith("dk")
        )

    def received_bytes(self, rank: int) -> int:
        return sum(e.nbytes for e in self.select(TraceAction.RECV, rank))

    def work(self, rank: int) -> int:
        """The (query, key) scores ``rank`` computed over the whole run, summed over heads:
        how balance between ranks is measured (spec §5). Per step, the events' ``pairs``
        say the same for each step."""
        return sum(e.pairs for e in self.select(TraceAction.COMPUTE, rank))

    @property
    def num_steps(self) -> int:
        return max((e.step for e in self.events), default=-1) + 1

    def table(self) -> str:
        """A per-step text table: one line per step and rank, what it sent, got and did."""
        rows = [
            (step, rank, *_cells(events))
            for step in range(self.num_steps)
            for rank in range(self.world_size)
            if (events := [e for e in self.events if e.step == step and e.rank == rank])
        ]
        sent_w = max([len("sent")] + [len(r[2]) for r in rows])  # columns fit their text
        got_w = max([len("received")] + [len(r[3]) for r in rows])
        lines = [f"{'step':>4} {'rank':>4}  {'sent':<{sent_w}}  {'received':<{got_w}}  computed"]
        lines += [
            f"{s:>4} {r:>4}  {sent:<{sent_w}}  {got:<{got_w}}  {done}"
            for s, r, sent, got, done in rows
        ]
        total = sum(self.sent_bytes(r) for r in range(self.world_size))
        lines.append(
            f"bytes sent: {total} in all; per rank: "
            + ", ".join(str(self.sent_bytes(r)) for r in range(self.world_size))
        )
        return "\n".join(lines)


def _transfers(events: Iterable[Event], action: TraceAction, arrow: str) -> str:
    parts = [f"{arrow}{e.peer}:{e.nbytes}B" for e in events if e.action is action]
    return " ".join(parts) if parts else "-"


def _cells(events: list[Event]) -> tuple[str, str, str]:
    """The sent, received and computed cells of one rank's events at one step."""
    sent = _transfers(events, TraceAction.SEND, "->")
    got = _transfers(events, TraceAction.RECV, "<-")
    done = [
        f"B{e.source_rank}/s{e.subring}:{e.detail}"
        for e in events
        if e.action in (TraceAction.COMPUTE, TraceAction.SKIP)
    ]
    return sent, got, " ".join(done) or "-"


def closed_form_bytes(
    config: DilatedConfig,
    num_heads: int,
    batch: int,
    head_dim: int,
    seq_len: int,
    world_size: int,
    rank: int,
    itemsize: int = 8,
    layout: str = "contiguous",
    num_kv_heads: int | None = None,
    key_padding: bool = False,
) -> int:
    """spec §5's closed form: the K/V bytes ``rank`` sends in the forward of an aligned
    configuration, computed from the formula alone (no plan), to check the plan and the
    trace against. ``layout="zigzag"``: Note [Zigzag bytes]. ``num_kv_heads`` (grouped-query
    attention): a message carries each selected row once per K/V head its heads read.
    ``key_padding``: each selected row also carries its padding, one element per pattern
    group (offset) of the pair."""
    kv = num_heads if num_kv_heads is None else num_kv_heads
    widths = _row_widths(config, num_heads, seq_len, kv, head_dim, key_padding)
    if layout == "zigzag":
        return _zigzag_bytes(config, widths, batch, seq_len, world_size, rank, itemsize)
    c = seq_len // world_size
    total = 0
    for w_eff, r, width in widths:
        g = w_eff // c  # the sub-ring's ranks; the rank's place in it:
        messages = _one_piece_messages((rank * c % w_eff) // c, g, config.is_causal)
        total += messages * batch * (c // r) * width * itemsize
    return total


def _row_widths(config: DilatedConfig, num_heads: int, seq_len: int, num_kv_heads: int,
                head_dim: int, key_padding: bool) -> list[tuple[int, int, int]]:  # fmt: skip
    """``(w', r, width)`` of every pair, width the elements a message carries per selected
    row: K and V of each head row (the pair's heads, or with grouped-query attention the K/V
    heads each offset's heads read), and with key padding one more per pattern group."""
    ratio = kv_ratio(num_heads, num_kv_heads)
    width = [0] * config.num_pairs
    for group in config.pattern_groups(num_heads):
        width[group.pair] += 2 * len(kv_heads(group.heads, ratio)) * head_dim + key_padding
    return list(zip(config.effective_segment_lengths(seq_len), config.dilation_rates, width))


def _one_piece_messages(place: int, g: int, is_causal: bool) -> int:
    """Messages the rank at ``place`` of a sub-ring of g one-piece ranks sends (spec §5)."""
    if g <= 1:
        return 0
    if not is_causal:
        return g - 1
    return place + 1 if place < g - 1 else 0


def _zigzag_bytes(config, widths, batch, seq_len, world_size, rank, itemsize):
    """Note [Zigzag bytes]
    ----------------------
    With 2P chunks of ``s = n / 2P`` positions, an aligned configuration (each ``w' <= s``
    divides s, each ``w' > s`` is m chunks with m dividing 2P, each r divides s) has three
    kinds of segments of a pair with ``w' = m*s``, m > 1 (``w' <= s``: inside a chunk,
    nothing sent):

    - in the first half (chunks below P): m consecutive ranks, one piece each, in rank
      order; in the second half: m ranks, one piece each, in descending rank order (the
      first position each holds). Either way the rank at place a of the m sends as a
      contiguous ring's does: ``m - 1`` messages, or causal ``a + 1`` if ``a < m - 1``;
    - across the middle (when m does not divide P): chunks ``P - m/2 .. P + m/2 - 1``,
      held by the ``g = m/2`` ranks ``P - g .. P - 1``, two pieces each (the early chunk j
      and the late chunk 2P-1-j). Non-causal, each sends ``g - 1`` messages of both pieces.
      Causal, an early piece is useful at every other place (every late chunk comes after
      it), so it goes all ``g - 1`` hops; the late piece of place a is useful only at places
      before a, the last of them ``g - 1`` hops on, and never for place 0. A rank forwards,
      in its ``g - 1`` messages, the blocks of every place but the next one, so it sends
      ``g - 1`` early pieces and ``g - 1`` late ones less one, unless it is the last place
      (the one whose next is place 0).

    A piece carries ``s / r`` rows of each of the pair's H heads (with grouped-query attention,
    H counts K/V heads: those each offset's heads read): ``batch * H * (s / r) * head_dim``
    elements of K and as many of V (and with key padding ``batch * (s / r)`` more per
    pattern group: :func:`_row_widths`).
    """
    p, s = world_size, seq_len // (2 * world_size)
    chunks = (rank, 2 * p - 1 - rank)
    total = 0
    for w_eff, r, width in widths:
        m = w_eff // s
        if m <= 1:
            continue
        piece = batch * (s // r) * width * itemsize  # K and V (and the keys' padding)
        middle = p // m if p % m else None  # the segment across the middle, if any
        pieces = 0
        for chunk in chunks:
            segment = chunk // m
            if segment == middle:
                continue
            place = chunk - segment * m  # first half: ascending; second: by position too
            pieces += _one_piece_messages(place, m, config.is_causal)
        if middle is not None and middle * m <= rank:  # this rank holds both halves of it
            g = m // 2
            place = rank - (p - g)
            if not config.is_causal:
                pieces += 2 * (g - 1)
            else:
                pieces += (g - 1) + (g - 1 if place == g - 1 else g - 2)
        total += pieces * piece
    return total

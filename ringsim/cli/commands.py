"""``ringsim demo`` and ``ringsim trace``: one configuration on the simulated ring, explained.

Both run :func:`ringsim.reference.ring_dilated_attention` with its trace and print it for a
reader: ``demo`` as one page (configuration, heads, sub-rings, the step table, bytes,
parity), ``trace`` event by event, one step at a time.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from ringsim.cases import Case
from ringsim.config import make_config
from ringsim.layout import rank_chunks
from ringsim.plan import SubRing, rank_subrings
from ringsim.trace import Event, Trace, TraceAction

from .progress import Progress
from .tables import format_table


def positions_text(rows: range) -> str:
    """Global positions, short: ``0-5``, ``1,4,7``, ``0,3,...,21``, ``none``."""
    if len(rows) == 0:
        return "none"
    if len(rows) == 1:
        return str(rows[0])
    if rows.step == 1:
        return f"{rows[0]}-{rows[-1]}"
    if len(rows) <= 4:
        return ",".join(str(x) for x in rows)
    return f"{rows[0]},{rows[1]},...,{rows[-1]}"


def ranks_text(ranks: Sequence[int]) -> str:
    """``2``, ``0-3`` (consecutive, ascending), or ``3,2,0`` (the sub-ring's order)."""
    if len(ranks) == 1:
        return str(ranks[0])
    if list(ranks) == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))


def shard_text(case: Case, rank: int) -> str:
    """The positions ``rank`` holds in ``case``'s layout: ``0-5`` or ``0-2+21-23``."""
    chunks = rank_chunks(case.layout, rank, case.seq_len, case.world_size)
    return "+".join(positions_text(c) for c in chunks)


def all_subrings(case: Case) -> dict[int, SubRing]:
    """Every sub-ring of the ring, by index (the union of each rank's)."""
    config = make_config(case.segment_lengths, case.dilation_rates, mode=case.mode)
    return {
        s.index: s
        for rank in range(case.world_size)
        for s in rank_subrings(config, case.seq_len, case.world_size, rank, case.layout)
    }


def run_case(case: Case, seed: int, dtype: str):
    """Inputs of ``case`` from ``seed``, and the simulated ring's out, lse and trace."""
    from ringsim.reference.simulate import run_case as simulate

    q, k, v = case.inputs(seed, np.dtype(dtype))
    return (q, k, v), *simulate(case, q, k, v)


def _heading(text: str) -> None:
    print(f"\n{text}")


def print_configuration(case: Case, args: argparse.Namespace) -> None:
    c = case.seq_len // case.world_size
    shards = ", ".join(f"rank {r} {shard_text(case, r)}" for r in range(case.world_size))
    mode = {"longnet": "every head uses every pair", "grouped": "head group i uses pair i only"}[
        case.mode
    ]
    print("Configuration")
    rows = [
        (
            "q, k, v",
            f"(batch {case.batch}, seq_len {case.seq_len}, num_heads "
            f"{case.num_heads}, head_dim {case.head_dim}) {args.dtype}, seed {args.seed}",
        ),
        ("segment_lengths", ", ".join(map(str, case.segment_lengths))),
        ("dilation_rates", ", ".join(map(str, case.dilation_rates))),
        ("mode", f"{case.mode} ({mode})"),
        ("causal", "yes" if case.is_causal else "no"),
        ("world_size", f"{case.world_size} ranks of {c} positions: {shards}"),
        ("layout", case.layout),
    ]
    print("\n".join(format_table(("", ""), rows, left=(0, 1))[1:]))


def print_heads(case: Case) -> None:
    config = make_config(case.segment_lengths, case.dilation_rates, mode=case.mode)
    _heading("Heads and their patterns (segment_length, dilation_rate, offset = head mod rate)")
    rows = []
    for head in range(case.num_heads):
        cells = ["-"] * config.num_pairs
        for group in config.pattern_groups(case.num_heads):
            if head in group.heads:
                p = group.pattern
                cells[group.pair] = f"({p.segment_length}, {p.dilation_rate}, {p.offset})"
        rows.append((head, *cells))
    headers = ("head", *(f"pair {i}" for i in range(config.num_pairs)))
    print("\n".join(format_table(headers, rows, left=range(1, len(headers)))))


def print_subrings(case: Case) -> None:
    _heading("Sub-rings: the ranks whose shards meet a segment pass its rows around")
    rows = [
        (
            s.index,
            s.pair,
            s.segment,
            positions_text(range(s.start, s.stop)),
            ranks_text(s.ranks),
            s.size - 1 if s.size > 1 else "0 (inside one shard)",
        )
        for s in sorted(all_subrings(case).values(), key=lambda s: s.index)
    ]
    headers = ("sub-ring", "pair", "segment", "positions", "ranks", "transfers")
    print("\n".join(format_table(headers, rows, left=(3, 4, 5))))


def print_per_rank(trace: Trace, case: Case) -> None:
    _heading(
        "Work, traffic and memory per rank (work = (query, key) scores over all heads; "
        "payload bytes; peak = arrays held at once)"
    )
    work = [trace.work(r) for r in range(trace.world_size)]
    mean = sum(work) / len(work) or 1
    rows = [
        (
            r,
            shard_text(case, r),
            work[r],
            f"{work[r] / mean:.2f}",
            len(trace.select(TraceAction.SEND, r)),
            trace.sent_bytes(r),
            trace.received_bytes(r),
            trace.peak_bytes[r],
        )
        for r in range(trace.world_size)
    ]
    headers = ("rank", "shard", "work", "/ mean", "messages sent", "bytes sent",
               "bytes received", "peak bytes")  # fmt: skip
    print("\n".join(format_table(headers, rows, left=(1,))))


#: Above this estimate the demo says, before the dense check, what it will cost.
DENSE_NOTE_BYTES = 1 << 30


def dense_check_bytes(case: Case) -> int:
    """About what the dense definition holds at once: a few float64 ``(b, n, n)`` arrays of
    one head's scores and masks (measured: 8.7 GB at n = 16384, b = 1)."""
    return 4 * case.batch * case.seq_len**2 * 8


def run_demo(args: argparse.Namespace, case: Case) -> int:
    from ringsim.reference.parity import check_case

    print(f"ringsim demo: ring dilated attention on {case.world_size} simulated ranks\n")
    print_configuration(case, args)
    print_heads(case)
    print_subrings(case)
    (q, k, v), out, lse, trace = run_case(case, args.seed, args.dtype)
    _heading("Steps: what each rank sent (->rank:bytes), received (<-rank:bytes) and computed")
    print("  (Bj/si:action = rank j's block of sub-ring i, whose pair and segment the table "
          "above gives;\n   one action per offset group)")  # fmt: skip
    print("\n".join("  " + line for line in trace.table().splitlines()))
    print_per_rank(trace, case)
    _heading("Parity with the dense-mask definition (max abs error of out and lse)")
    if args.no_check:
        print("  skipped (--no-check)")
        return 0
    need = dense_check_bytes(case)
    if need <= DENSE_NOTE_BYTES:
        report = check_case(case, out, lse, q, k, v)
    else:
        print(f"  the dense check holds about {need / 2**30:.1f} GiB of n x n scores and may "
              "take minutes; --no-check skips it", flush=True)  # fmt: skip
        with Progress(case.num_heads, "dense check (heads)") as bar:
            report = check_case(case, out, lse, q, k, v, on_head=lambda _: bar.advance())
    print(f"  {report.line()}")
    print("PASS" if report.ok else "FAIL")
    return 0 if report.ok else 1


# --- trace ---------------------------------------------------------------------------------


def _event_row(event: Event, subrings: dict[int, SubRing]) -> tuple[object, ...]:
    ring = subrings[event.subring] if event.subring is not None else None
    where = f"{ring.index} (ranks {ranks_text(ring.ranks)})" if ring is not None else "-"
    block = f"B{event.source_rank}" if event.source_rank is not None else "-"
    if event.action in (TraceAction.SEND, TraceAction.RECV):
        arrow = "->" if event.action is TraceAction.SEND else "<-"
        rows = " | ".join(positions_text(r) for r in event.rows)
        return (
            event.rank,
            event.action.value,
            block,
            f"{arrow} {event.peer}",
            event.nbytes,
            event.pair,
            where,
            f"K/V rows {rows}",
        )
    actions = event.detail.replace(",", ", ")
    return (event.rank, event.action.value, block, "", "", event.pair, where, actions)


def _pause(step: int, num_steps: int) -> bool:
    """Wait for Enter; False when the reader asks to quit (q, or end of input)."""
    try:
        answer = input(
            f"-- step {step + 1} of {num_steps} done: press Enter for the next step, q to quit "
        )
    except EOFError:
        return False
    return answer.strip().lower() != "q"


def run_trace(args: argparse.Namespace, case: Case) -> int:
    _, _, _, trace = run_case(case, args.seed, args.dtype)
    subrings = all_subrings(case)
    pausing = args.step and sys.stdin is not None and sys.stdin.isatty()
    if args.step and not pausing:
        print(
            "note: --step: stdin is not a terminal, so every step is printed without pausing",
            file=sys.stderr,
        )
    print(f"ringsim trace: {case.describe()}, {args.dtype}, seed {args.seed}")
    print(
        "Blocks: Bj is rank j's K/V rows of one sub-ring; rows are global positions, one "
        "list per offset group."
    )
    print("Every compute is followed by a merge into the rank's running (out, lse).")
    print_subrings(case)
    headers = ("rank", "event", "block", "peer", "bytes", "pair", "sub-ring", "rows / actions")
    for step in range(trace.num_steps):
        _heading(f"step {step + 1} of {trace.num_steps}")
        events = [e for e in trace.events if e.step == step and e.action is not TraceAction.MERGE]
        rows = [_event_row(e, subrings) for e in events]
        print("\n".join(format_table(headers, rows, left=(1, 2, 3, 6, 7))))
        if pausing and step + 1 < trace.num_steps and not _pause(step, trace.num_steps):
            print(f"stopped after step {step + 1}")
            return 0
    print_per_rank(trace, case)
    return 0

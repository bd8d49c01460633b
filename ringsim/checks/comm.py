"""mpiexec -n 4 python -m mpi4py -m ringsim.checks.comm [--fault drop --fault-rank 1]

Smoke check of :class:`ringsim.comm.MPICommunicator`: every rank sends random payloads to
rank+1 and receives from rank-1 for a few rounds (overlapped ``start``/``wait`` and blocking
``exchange`` alternate; every fourth round, from the second, receives into arrays it names,
``Recv.into``) and verifies what arrives against the sender's seeded generator;
then a message shorter and one longer than its receive expects must each raise CommError.
Rank 0 prints ``PASS comm world_size=P ...`` or ``FAIL comm ...`` naming the ranks that saw
wrong data; on failure every rank exits non-zero. A fault (``--fault``) is injected with
:class:`ringsim.comm.FaultyCommunicator`: drop ends in CommTimeout on the receiving rank,
crash in RankCrashed on the faulty rank (both end every rank with one ``FAIL`` line from the
rank that saw it),
corrupt in FAIL, delay in PASS.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import replace
from typing import NoReturn

import numpy as np

from ringsim.comm import (
    CommError,
    Communicator,
    Fault,
    FaultKind,
    FaultyCommunicator,
    MPICommunicator,
    Payload,
    Recv,
    Send,
    payload_nbytes,
)

from .abort import abort_all, finish

DTYPES = (np.float64, np.float32)  # one per round, in turn


def payload_of(seed: int, rank: int, round_: int) -> Payload:
    """What ``rank`` sends in round ``round_``: random arrays (a, 3) and (b,), a >= 0, b >= 1."""
    rng = np.random.default_rng([seed, rank, round_])
    dtype = DTYPES[round_ % len(DTYPES)]
    a, b = int(rng.integers(0, 7)), int(rng.integers(1, 7))  # b >= 1: never all empty
    return (rng.standard_normal((a, 3)).astype(dtype), rng.standard_normal(b).astype(dtype))


def ring_rounds(comm: Communicator, rounds: int, seed: int) -> tuple[list[str], int]:
    """Run the rounds; returns this rank's mismatch descriptions and payload bytes sent."""
    rank, size = comm.rank, comm.world_size
    send_rank, recv_rank = (rank + 1) % size, (rank - 1) % size
    problems, sent = [], 0
    for round_ in range(rounds):
        payload = payload_of(seed, rank, round_)
        expected = payload_of(seed, recv_rank, round_)
        recv = Recv(recv_rank, round_, tuple(a.shape for a in expected), expected[0].dtype)
        if round_ % 4 == 1:  # into the receiver's own arrays
            recv = replace(recv, into=tuple(np.full_like(e, np.nan) for e in expected))
        sends = [Send(send_rank, round_, payload)]
        if round_ % 2 == 0:
            request = comm.start(sends, [recv])
            payload[0][...] = np.nan  # posted payloads are copied: this must not travel
            (got,) = request.wait()
        else:
            (got,) = comm.exchange(sends, [recv])
        sent += payload_nbytes(payload)
        if recv.into is not None and not all(g is t for g, t in zip(got, recv.into)):
            problems.append(f"rank {rank} round {round_}: not received into the arrays named")
        for index, (g, e) in enumerate(zip(got, expected, strict=True)):
            if g.shape != e.shape or g.dtype != e.dtype or not np.array_equal(g, e):
                problems.append(
                    f"rank {rank} round {round_} array {index} from rank {recv_rank} differs"
                )
    return problems, sent


def size_probes(comm: Communicator, seed: int) -> list[str]:
    """A message shorter, then longer, than its receive expects must raise CommError."""
    rank, size = comm.rank, comm.world_size
    send_rank, recv_rank = (rank + 1) % size, (rank - 1) % size
    rng = np.random.default_rng([seed, rank, 1000])
    problems = []
    for tag, expected in ((1000, 5), (1001, 3)):  # 4 elements are sent each time
        sends = [Send(send_rank, tag, (rng.standard_normal(4),))]
        try:
            comm.exchange(sends, [Recv(recv_rank, tag, ((expected,),), np.dtype(np.float64))])
        except CommError as error:
            if f"from rank {recv_rank} tag {tag}" not in str(error):
                problems.append(f"rank {rank} size probe {tag}: unclear error: {error}")
        else:
            problems.append(f"rank {rank} size probe {tag}: 4 elements accepted as {expected}")
    return problems


def main(argv: Sequence[str] | None = None) -> NoReturn:
    parser = argparse.ArgumentParser(prog="ringsim.checks.comm", description=__doc__)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per wait")
    parser.add_argument("--fault", choices=[k.value for k in FaultKind], default=None)
    parser.add_argument("--fault-rank", type=int, default=0)
    parser.add_argument("--fault-message", type=int, default=0)
    parser.add_argument("--fault-delay", type=float, default=0.2, help="seconds (delay)")
    args = parser.parse_args(argv)

    mpi = MPICommunicator(timeout=args.timeout)
    comm: Communicator = mpi
    fault = "none"
    if args.fault is not None:
        if not 0 <= args.fault_rank < mpi.world_size:
            parser.error(f"--fault-rank must be in [0, {mpi.world_size})")
        injected = Fault(
            FaultKind(args.fault), args.fault_rank, args.fault_message, args.fault_delay
        )
        comm = FaultyCommunicator(mpi, [injected])
        fault = f"{args.fault}@rank{args.fault_rank}:message{args.fault_message}"

    try:
        problems, sent = ring_rounds(comm, args.rounds, args.seed)
        problems += size_probes(mpi, args.seed)  # unwrapped: faults count only the rounds'
        reports = mpi.allgather((problems, sent))
    except CommError as err:  # drop (CommTimeout), crash (RankCrashed): one line, all stop
        abort_all(mpi.mpi_comm, f"FAIL comm world_size={mpi.world_size} rank {mpi.rank} "
                           f"fault={fault}: {type(err).__name__}: {err}")  # fmt: skip
    failed = [p for ps, _ in reports for p in ps]  # type: ignore[misc]
    if mpi.rank == 0:
        total = sum(s for _, s in reports)  # type: ignore[misc]
        head = "FAIL" if failed else "PASS"
        detail = ("; " + "; ".join(failed)) if failed else ""
        print(
            f"{head} comm world_size={mpi.world_size} rounds={args.rounds} "
            f"bytes={total} fault={fault}{detail}",
            flush=True,
        )
    finish(1 if failed else 0)  # the same status on every rank


if __name__ == "__main__":
    main()

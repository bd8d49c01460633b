"""Ranks of one ring agree on their input before the ring starts, or fail together.

Each rank validates its own input first (no communication). Then every rank shares, in one
collective, a description of its configuration and shard shapes and whether its own check
failed. Every rank then raises the same kind of error with one message, instead of some
ranks entering the ring and waiting forever for ranks that never come (SPEC 7).
"""

from __future__ import annotations

from ringsim.comm.base import Communicator


def agree(comm: Communicator, description: str, error: Exception | None) -> None:
    """Raise on every rank unless every rank passed its checks with the same description.

    Args:
        comm: the ring's communicator (one ``allgather``).
        description: this rank's configuration and shard shapes, as text.
        error: the exception this rank's own checks raised, or None.
    Raises:
        the rank's own ``error``; else ``ValueError`` naming the rank that failed or the
        ranks that disagree.
    """
    message = None if error is None else f"{type(error).__name__}: {error}"
    reports = comm.allgather((description, message))
    if error is not None:
        raise error
    for rank, (_, other) in enumerate(reports):
        if other is not None:
            raise ValueError(f"rank {rank} rejected its input, so every rank stops: {other}")
    descriptions = [d for d, _ in reports]
    if any(d != descriptions[0] for d in descriptions):
        lines = "; ".join(f"rank {r}: {d}" for r, d in enumerate(descriptions))
        raise ValueError(f"ranks disagree on the configuration or shard shapes: {lines}")

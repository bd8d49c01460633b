"""Helpers of the communicator tests: random payloads, receives shaped like them, exact
comparison, and one ring exchange per step."""

from __future__ import annotations

import numpy as np

from ringsim.comm import Communicator, Payload, Recv, Send


def random_payloads(seed: int, world_size: int, steps: int, dtype=np.float64) -> list:
    """``payloads[rank][step]``: two random arrays of random shapes (one may be empty)."""
    rng = np.random.default_rng(seed)
    return [
        [
            (
                rng.standard_normal((int(rng.integers(0, 5)), 3)).astype(dtype),
                rng.standard_normal((2, int(rng.integers(1, 6)))).astype(dtype),
            )
            for _ in range(steps)
        ]
        for _ in range(world_size)
    ]


def recv_for(source: int, tag: int, like: Payload) -> Recv:
    return Recv(source, tag, tuple(a.shape for a in like), like[0].dtype)


def assert_same(got: Payload, want: Payload) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)
        assert not np.shares_memory(g, w)  # received arrays are never the sender's memory


def ring_once(payloads: list, steps: int):
    """Each rank sends ``payloads[rank][step]`` to rank+1 and receives from rank-1."""

    def fn(comm: Communicator) -> list[Payload]:
        rank, p = comm.rank, comm.world_size
        got = []
        for step in range(steps):
            source = (rank - 1) % p
            sends = [Send((rank + 1) % p, step, payloads[rank][step])]
            got += comm.exchange(sends, [recv_for(source, step, payloads[source][step])])
        return got

    return fn

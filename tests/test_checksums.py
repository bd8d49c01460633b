"""Optional message checksums (issue: a corrupted message was found only by the parity
check afterwards): with ``checksums=True`` a corruption fails the run at once, naming the
receiving rank, the sender, the step and the sub-ring; without a fault nothing changes."""

from __future__ import annotations

import numpy as np
import pytest
from comm_support import random_payloads, recv_for

from ringsim.cases import Case
from ringsim.comm import (
    ChecksummedCommunicator,
    CorruptMessage,
    Fault,
    FaultKind,
    RankFailed,
    Send,
    SimulatedCluster,
)
from ringsim.comm.checksum import SEAL_SHAPE, crc32, seal, sealed, unseal
from ringsim.reference import (
    dilated_attention,
    ring_dilated_attention,
    ring_dilated_attention_backward,
)
from ringsim.trace import TraceAction

CASE = Case(1, 12, 2, 4, (6, 12), (1, 2), False, "longnet", world_size=3)


def test_no_fault_same_result_and_same_trace():
    q, k, v = CASE.inputs(seed=0)
    args = (CASE.segment_lengths, CASE.dilation_rates)
    checked = ring_dilated_attention(q, k, v, *args, world_size=3, checksums=True,
                                     return_lse=True, return_trace=True)  # fmt: skip
    plain = ring_dilated_attention(q, k, v, *args, world_size=3, return_lse=True,
                                   return_trace=True)  # fmt: skip
    np.testing.assert_array_equal(checked[0], plain[0])
    np.testing.assert_array_equal(checked[1], plain[1])
    assert checked[2] == plain[2]  # the trace counts the data, not the seal
    np.testing.assert_allclose(checked[0], dilated_attention(q, k, v, *args), atol=1e-12)


def test_a_corrupted_block_names_rank_step_and_subring():
    q, k, v = CASE.inputs(seed=1)
    with pytest.raises(RankFailed) as info:
        ring_dilated_attention(q, k, v, CASE.segment_lengths, CASE.dilation_rates,
                               world_size=3, checksums=True,
                               faults=[Fault(FaultKind.CORRUPT, rank=1, message=1)])  # fmt: skip
    error = info.value.error
    assert isinstance(error, CorruptMessage) and info.value.rank == 2
    assert str(error).startswith("rank 2 received a corrupted message from rank 1 (tag 1)")
    assert str(error).endswith("(step 1: the K/V block of sub-ring 1 (pair 0) that rank 1 owns)")


def test_a_corrupted_gradient_names_the_dk_dv():
    q, k, v = CASE.inputs(seed=2)
    args = (CASE.segment_lengths, CASE.dilation_rates)
    out, lse = ring_dilated_attention(q, k, v, *args, world_size=3, return_lse=True)
    dout = CASE.upstream(seed=2)
    *_, trace = ring_dilated_attention_backward(
        q, k, v, out, lse, dout, *args, world_size=3, return_trace=True
    )
    sends = [e for e in trace.events if e.rank == 1 and e.action is TraceAction.SEND]
    sends.sort(key=lambda e: e.step)  # rank 1's sends in posting order
    first_grad = next(i for i, e in enumerate(sends) if e.detail)  # onward or return
    fault = Fault(FaultKind.CORRUPT, rank=1, message=first_grad)
    with pytest.raises(RankFailed) as info:
        ring_dilated_attention_backward(
            q, k, v, out, lse, dout, *args, world_size=3, checksums=True, faults=[fault]
        )
    assert isinstance(info.value.error, CorruptMessage)
    assert "the dK/dV of sub-ring" in str(info.value.error), info.value.error


def test_without_checksums_a_corruption_goes_through():
    """The reason for the option: the run completes with wrong values."""
    q, k, v = CASE.inputs(seed=1)
    args = (CASE.segment_lengths, CASE.dilation_rates)
    out = ring_dilated_attention(q, k, v, *args, world_size=3,
                                 faults=[Fault(FaultKind.CORRUPT, rank=1, message=1)])  # fmt: skip
    assert np.abs(out - dilated_attention(q, k, v, *args)).max() > 1e-3


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_seal_round_trip_and_every_changed_element_is_caught(dtype):
    payload = tuple(a.astype(dtype) for a in random_payloads(3, 1, 1)[0][0])
    sealed_payload = seal(payload)
    assert sealed_payload[-1].shape == SEAL_SHAPE and sealed_payload[-1].dtype == dtype
    recv = sealed(recv_for(0, 5, payload))
    for got, want in zip(unseal(sealed_payload, 1, recv), payload, strict=True):
        np.testing.assert_array_equal(got, want)
    for i in range(len(payload)):
        bad = list(sealed_payload)
        bad[i] = bad[i].copy()
        bad[i].reshape(-1)[0] += 1
        with pytest.raises(CorruptMessage, match="from rank 0 \\(tag 5\\)"):
            unseal(tuple(bad), 1, recv)


def test_torch_bfloat16_payloads_are_sealed_on_their_device():
    torch = pytest.importorskip("torch")
    payload = (torch.randn(2, 3, dtype=torch.bfloat16), torch.randn(4, dtype=torch.bfloat16))
    sealed_payload = seal(payload)
    assert sealed_payload[-1].dtype == torch.bfloat16 and sealed_payload[-1].shape == (4,)
    digits = [int(x) for x in sealed_payload[-1].tolist()]
    assert int.from_bytes(bytes(digits), "little") == crc32(payload)


def test_the_wrapper_over_the_cluster():
    payload = random_payloads(4, 1, 1)[0][0]

    def fn(comm):
        checked = ChecksummedCommunicator(comm)
        peer = 1 - comm.rank
        return checked.exchange([Send(peer, 0, payload)], [recv_for(peer, 0, payload)])

    for got in SimulatedCluster(2).run(fn):
        for g, w in zip(got[0], payload, strict=True):
            np.testing.assert_array_equal(g, w)
    with pytest.raises(TypeError, match="checksums"):
        SimulatedCluster(2, checksums="yes")

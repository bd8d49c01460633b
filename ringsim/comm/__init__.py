"""Communicators: the protocol, the simulated cluster, MPI, and injected faults.

Importing this package never imports mpi4py: :class:`MPICommunicator` imports it when one
is created.
"""

from .base import (
    CommError,
    CommTimeout,
    Communicator,
    DeadlockError,
    Payload,
    RankCrashed,
    RankFailed,
    Recv,
    Request,
    Send,
    payload_nbytes,
)
from .checksum import ChecksummedCommunicator, CorruptMessage
from .faults import Fault, FaultKind, FaultyCommunicator
from .mpi import MPICommunicator
from .simulated import ClusterAborted, SimulatedCluster, SimulatedCommunicator

__all__ = [
    "ChecksummedCommunicator",
    "ClusterAborted",
    "CommError",
    "CommTimeout",
    "Communicator",
    "CorruptMessage",
    "DeadlockError",
    "Fault",
    "FaultKind",
    "FaultyCommunicator",
    "MPICommunicator",
    "Payload",
    "RankCrashed",
    "RankFailed",
    "Recv",
    "Request",
    "Send",
    "SimulatedCluster",
    "SimulatedCommunicator",
    "payload_nbytes",
]

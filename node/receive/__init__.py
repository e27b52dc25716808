"""The DIMSE SCP: Verification and Storage into the spool."""

from node.receive.check import StoreStatus
from node.receive.scp import ReceiveCounters, build_ae, start_listeners, start_scp

__all__ = ["ReceiveCounters", "StoreStatus", "build_ae", "start_listeners", "start_scp"]

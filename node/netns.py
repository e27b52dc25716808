"""A private network namespace with only loopback up: for ``synthnode demo``, the tests and the
benchmarks, so the servers they start are reachable from nowhere else.

Standard library only.
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
from pathlib import Path

ISOLATED_ENV = "SYNTHNODE_ISOLATED"
"""Set to "1" in a process that has isolated itself; its children, inheriting it (and the
namespace), do not isolate again."""
_CLONE_NEWNS = 0x00020000
_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000


def isolate_network() -> None:
    """Move this process (and the children it starts later) into a private network namespace
    with only loopback up, and a private mount namespace; as a non-root user through a user
    namespace. Call it while the process has one thread. OSError when the kernel refuses (not
    root, and unprivileged user namespaces are off)."""
    if os.environ.get(ISOLATED_ENV) == "1":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.geteuid(), os.getegid()
    flags = _CLONE_NEWNET | _CLONE_NEWNS | (_CLONE_NEWUSER if uid != 0 else 0)
    if libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot create a private network namespace ({os.strerror(err)}): "
                      "run as root, or where unprivileged user namespaces are allowed")
    if uid != 0:
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
        Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
    # Mounts made from here on must not leak to the host.
    subprocess.run(["mount", "--make-rprivate", "/"], check=False, capture_output=True)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    os.environ[ISOLATED_ENV] = "1"


def interfaces() -> list[str]:
    """The network interfaces this process sees (``["lo"]`` once isolated)."""
    return [name for _, name in socket.if_nameindex()]

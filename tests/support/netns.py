"""Network namespaces for tests: "hosts" on one private subnet, built and removed by the test.

The hub namespace holds a bridge; every other namespace gets one end of a veth pair whose other
end is on that bridge. Addresses are in 10.213.13.0/24, assigned only inside these namespaces;
nothing is created in the machine's own namespace. Names start with ``i13b-`` and a random tag,
so two runs never share one. Needs ``ip`` and root (CI runs as root): without them a test fails
with a sentence, it does not skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import pytest

SUBNET = "10.213.13"
HUB_ADDRESS = f"{SUBNET}.1"


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class Hosts:
    """Namespaces named by role (``hub`` first), each with its address on the subnet."""

    def __init__(self, *roles: str) -> None:
        if shutil.which("ip") is None or os.geteuid() != 0:
            pytest.fail(
                "this test builds network namespaces: it needs the `ip` command (iproute2) and "
                "root (CI runs `make test` as root)"
            )
        tag = uuid.uuid4().hex[:6]
        self.names = {role: f"i13b-{tag}-{role}" for role in ("hub", *roles)}
        self.addresses = {"hub": HUB_ADDRESS} | {role: f"{SUBNET}.{10 + i}" for i, role in enumerate(roles)}
        self._made: list[str] = []

    def __getitem__(self, role: str) -> str:
        return self.names[role]

    def up(self) -> Hosts:
        for name in self.names.values():
            _ip("netns", "add", name)
            self._made.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        hub = self.names["hub"]
        _ip("-n", hub, "link", "add", "i13b-br", "type", "bridge")
        _ip("-n", hub, "addr", "add", f"{HUB_ADDRESS}/24", "dev", "i13b-br")
        _ip("-n", hub, "link", "set", "i13b-br", "up")
        for i, (role, name) in enumerate(self.names.items()):
            if role == "hub":
                continue
            near, far = f"i13b-h{i}", f"i13b-x{i}"
            _ip("link", "add", near, "netns", hub, "type", "veth", "peer", "name", far, "netns", name)
            _ip("-n", hub, "link", "set", near, "master", "i13b-br", "up")
            _ip("-n", name, "addr", "add", f"{self.addresses[role]}/24", "dev", far)
            _ip("-n", name, "link", "set", far, "up")
        return self

    def down(self) -> None:
        """Remove the namespaces (their veths and bridge go with them). Stop their processes first:
        a namespace lives on while a process is in it."""
        errors = []
        for name in reversed(self._made):
            try:
                _ip("netns", "del", name)
            except RuntimeError as exc:
                errors.append(str(exc))
        self._made.clear()
        if errors:
            raise RuntimeError("; ".join(errors))

    def exists(self) -> list[str]:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return [name for name in self.names.values() if name in listed]

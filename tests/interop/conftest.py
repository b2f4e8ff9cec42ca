"""Fixtures for interoperability tests against the Linux kernel's IPsec, running in user-mode-linux.

One UML kernel is booted per test session (about 2 s) and shared by every cell: before each cell,
its SAs and policies are replaced (`ip xfrm policy/state flush`, then the cell's lines), and our
engine is started in the namespace with the cell's TOML. See docs/interop.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from nfq_ipsec.netns import Capture, EngineProcess, Namespace, Topology
from nfq_ipsec.umlpeer import UmlPeer, prepare_namespace, uml_missing_reason

from .cells import Keyed


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/interop" in str(item.fspath):
            item.add_marker(pytest.mark.interop)


class Bed:
    """Our namespace (tap + addresses) and the UML kernel on the other end of the tap."""

    def __init__(self, topo: Topology, tmp: Path) -> None:
        self.topo, self.tmp = topo, tmp
        self.ns: Namespace = topo.add("o")
        self.tap = f"nfqi{topo.tag}"
        prepare_namespace(self.ns, self.tap)
        self.boots = 0
        self.uml = self._boot()
        self._engine: EngineProcess | None = None
        self.config_path = tmp / "none.toml"
        self._n = 0

    def _boot(self) -> UmlPeer:
        self.boots += 1
        uml = UmlPeer(self.ns, self.tap, self.tmp / f"uml{self.boots}")
        uml.start()
        return uml

    def peer(self) -> UmlPeer:
        """The UML kernel, booted again if a previous test killed it (the next tests still get one)."""
        if not self.uml.alive():
            self.uml.stop()
            self.uml = self._boot()
        return self.uml

    def start_engine(self, keyed: Keyed) -> EngineProcess:
        """Configure both sides for one cell: kernel SAs/policies, then our engine with the mirror TOML."""
        self.stop_engine()
        self.peer()
        self._n += 1
        # forget path MTUs learnt in earlier cells: every cell starts from the link MTU
        self.ns.run(["ip", "route", "flush", "cache"])
        self.ns.run(["ip", "-6", "route", "flush", "cache"])
        self.uml.xfrm_apply(keyed.kernel_batch())
        sock = str(self.tmp / f"e{self._n}.sock")
        self.config_path = conf = self.tmp / f"cell{self._n}-{keyed.cell.name}.toml"
        conf.write_text(keyed.our_toml(control_socket=sock))
        conf.chmod(0o600)
        self._engine = EngineProcess(self.ns, str(conf), sock, str(self.tmp / f"cell{self._n}-{keyed.cell.name}.log"))
        self._engine.wait_ready()
        return self._engine

    def stop_engine(self, check: bool = True) -> str:
        """Stop the engine; returns everything it printed. Raises if it did not exit cleanly."""
        e, self._engine = self._engine, None
        if e is None:
            return ""
        rc = e.stop()
        out = e.output()
        if check and (rc != 0 or "Traceback" in out):
            raise AssertionError(f"engine exited {rc}:\n{out[-3000:]}")
        return out

    def destroy(self) -> None:
        try:
            if self._engine is not None:
                self._engine.stop()
        finally:
            try:
                self.uml.stop()
            finally:
                self.topo.destroy()


@pytest.fixture(scope="session")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    reason = uml_missing_reason()
    if reason:
        pytest.skip(f"no Linux kernel IPsec peer: {reason}")
    topo = Topology("nfi")
    try:
        b = Bed(topo, tmp_path_factory.mktemp("interop"))
    except BaseException:
        topo.destroy()
        raise
    try:
        yield b
    finally:
        b.destroy()


@pytest.fixture
def capture(bed: Bed, tmp_path: Path):  # type: ignore[no-untyped-def]
    def make(name: str = "tap") -> Capture:
        return Capture(bed.ns, bed.tap, tmp_path / f"{name}.pcap")

    return make

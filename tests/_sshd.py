"""Real OpenSSH servers for the SSH backend's tests: on loopback, and as hosts in network namespaces.

The fixtures are in ``conftest.py``: ``sshd_rig`` (one per test session) holds generated ed25519 keys: a host
key shared by every server, a client key, and a known_hosts file listing
the servers it starts.  Each server is ``/usr/sbin/sshd -D -e`` run as
root, logging to a file of its own (tests count the logins in it).

Three kinds of host (fixtures of the same names):

- ``ssh_host``: sshd on 127.0.0.1 at a free port, in a private mount
  namespace where root's ``~/.bashrc`` is a one-line file that puts this
  interpreter's folder first on ``PATH`` (the machine's own startup file
  runs slow tools for every command, and ``python3`` there is this
  virtualenv's, which has shoal).
- ``honest_host``: the same, also in private UTS and PID namespaces with a
  hostname of its own, a private tmpfs on ``/tmp`` and ``~/.cache``: it
  cannot see this test's folders (which live under ``/tmp``), so a code
  bundle or a blob must really travel to be seen there.  Only the rig's
  own folder, and the interpreter and source folders if they live under
  ``/tmp``, are bound back in.
- ``ns_hosts``: four honest hosts, each in a network namespace of its own
  reached over a veth pair at 10.200.N.2 (the rig's end is 10.200.N.1),
  port 22.  The rig's ends of the pairs are ports of one bridge, and each
  host routes all of 10.200.0.0/16 onto its link, so the hosts reach each
  other too (a gang's ranks talk to rank 0's host) without this machine
  forwarding anything.  :meth:`SSHHost.cut` takes a host's link down
  (``ip link set ... down``: cut off from the rig and the other hosts) or
  drops its packets (a blackhole route: from the rig only),
  :meth:`SSHHost.mend` brings it back.

No orphans: each server's first process has ``PR_SET_PDEATHSIG`` (SIGKILL)
and unshare's ``--kill-child``, so a killed test run takes its servers
with it, and killing that first process ends everything that ran on the
host (its PID namespace).  Namespaces are named ``shoal-rig-PID-N``; the
rig deletes those of runs that are gone when it starts.

Where a part is missing (not root, no sshd, no ``ip``/``unshare``, or
namespaces cannot be made) the tests skip saying which, except with
``CI=true``, where a missing part is a failure.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

SSHD = "/usr/sbin/sshd"
#: Prefix of the network namespaces this rig makes (then the owner's pid and a number).
NS_PREFIX = "shoal-rig-"
#: Prefix of the bridge the namespace hosts' links join (then the owner's pid).
BRIDGE_PREFIX = "shrb"
#: The addresses of namespace hosts (10.200.N.2) and the rig's ends (10.200.N.1).
FENCE = "10.200.0.0/16"
#: Seconds a server has to listen after it is started.
START_TIMEOUT = 10.0
PR_SET_PDEATHSIG = 1


def missing(reason: str) -> None:
    """Skip for a missing part of the machine; with ``CI=true``, fail instead."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the machine must have it; see .ci/run)")
    pytest.skip(reason)


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: the child gets SIGKILL when
    # the test process (the thread that started it) goes away.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    if check and done.returncode != 0:
        # What the command said, not only its exit status.
        raise RuntimeError(f"{' '.join(args)} exited with {done.returncode}: {done.stderr.strip()}")
    return done


@dataclass
class SSHHost:
    """One running sshd: where to reach it, what it calls itself, and its log."""

    address: str
    port: int
    hostname: str
    log: Path
    proc: subprocess.Popen[bytes]
    #: The rig's end of the host's veth pair (network-namespace hosts only).
    veth: str | None = None
    netns: str | None = None
    #: The rig's address on the host's subnet (``10.200.N.1/24``, on the rig's bridge).
    rig_end: str | None = None
    cut_how: str | None = field(default=None, repr=False)

    @property
    def spec(self) -> str:
        """The host as ``offload.SSH`` takes it."""
        return f"{self.address}:{self.port}" if self.port != 22 else self.address

    @property
    def pid(self) -> int:
        return self.proc.pid

    def logins(self) -> int:
        """How many logins the server has accepted so far (one per SSH connection)."""
        try:
            return self.log.read_text(errors="replace").count("Accepted publickey")
        except FileNotFoundError:
            return 0

    def cut(self, how: str = "down") -> None:
        """Take the host away: ``"down"`` (its link goes down) or ``"drop"`` (its packets vanish).

        Either way open connections stall until keepalives notice, and new
        connects fail at once.  (``tc netem`` is not in every kernel; a
        blackhole route drops the packets instead.)  The rig's covering
        ``unreachable 10.200.0.0/16`` route keeps the packets on this
        machine while the link is down.
        """
        assert self.veth is not None, "only network-namespace hosts can lose their link"
        if how == "down":
            _run("ip", "link", "set", self.veth, "down")
        elif how == "drop":
            _run("ip", "route", "add", "blackhole", f"{self.address}/32")
        else:
            raise ValueError(how)
        self.cut_how = how

    def mend(self) -> None:
        """Undo :meth:`cut`."""
        assert self.veth is not None
        if self.cut_how == "down":
            _run("ip", "link", "set", self.veth, "up")
        elif self.cut_how == "drop":
            _run("ip", "route", "del", "blackhole", f"{self.address}/32", check=False)
        self.cut_how = None

    def pid_here(self, pid: int) -> int | None:
        """This machine's pid of the process that is ``pid`` on the host (None: no such process, or it ended).

        An honest host has a PID namespace of its own; a namespace host
        also its own network namespace, by which its processes are told
        apart from the other hosts' (loopback hosts share this machine's).
        """
        space = os.stat(f"/run/netns/{self.netns}").st_ino if self.netns is not None else None
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if space is not None and os.stat(entry / "ns" / "net").st_ino != space:
                    continue
                status = (entry / "status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if fields.get("NSpid", "").split()[-1:] == [str(pid)] and not fields.get("State", "").strip().startswith("Z"):
                return int(entry.name)
        return None

    def stop(self) -> None:
        """Kill the host's first process (and with it everything on the host); wait for it."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


class SSHRig:
    """Keys, a known_hosts file and the servers started with them (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        import asyncssh

        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o755)
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        self.host_key = folder / "host_ed25519"
        host_key.write_private_key(str(self.host_key))
        self.host_key.chmod(0o600)
        self.host_public = host_key.export_public_key().decode().strip()
        client_key = asyncssh.generate_private_key("ssh-ed25519", comment="shoal-tests")
        self.client_key = folder / "client_ed25519"
        client_key.write_private_key(str(self.client_key))
        self.client_key.chmod(0o600)
        self.authorized_keys = folder / "authorized_keys"
        self.authorized_keys.write_text(client_key.export_public_key().decode())
        self.known_hosts = folder / "known_hosts"
        self.known_hosts.write_text("")
        # root's ~/.bashrc on the hosts: this interpreter first on PATH.
        self.bashrc = folder / "bashrc"
        self.bashrc.write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')
        self.hosts: list[SSHHost] = []
        self.namespaces: list[str] = []
        self._serial = 0
        self._fence = False
        # The bridge every namespace host's link joins (made with the first).
        self.bridge: str | None = None

    # -- servers ---------------------------------------------------------------

    def start(self, *, honest: bool = False, address: str = "127.0.0.1", port: int | None = None,
              netns: str | None = None, hostname: str | None = None) -> SSHHost:
        """Start one sshd and wait until it listens; it is listed in known_hosts."""
        self._serial += 1
        n = self._serial
        port = port or _free_port()
        name = hostname or f"shoal-host-{n}"
        config = self.folder / f"sshd-{n}.conf"
        log = self.folder / f"sshd-{n}.log"
        config.write_text(
            f"ListenAddress {address}\nPort {port}\nHostKey {self.host_key}\n"
            f"AuthorizedKeysFile {self.authorized_keys}\nPidFile none\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "MaxSessions 64\nMaxStartups 64:30:128\nSubsystem sftp internal-sftp\n"
            "ClientAliveInterval 0\nLogLevel INFO\n"
        )
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        script = self._script(config, honest, name)
        unshare = ["unshare", "-m", "--propagation", "private"]
        if honest:
            unshare += ["-u", "-p", "-f", "--kill-child"]
        command = [*unshare, "sh", "-c", script]
        if netns is not None:
            command = ["ip", "netns", "exec", netns, *command]
        logfile = open(log, "wb")  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT,
                # Fixtures run on the test's main thread, so the death signal
                # follows the test process itself.
                preexec_fn=_die_with_parent,
            )
        finally:
            logfile.close()
        host = SSHHost(address, port, name if honest else socket.gethostname(), log, proc, netns=netns)
        self.hosts.append(host)
        self._wait_listening(host)
        self.trust(address, port)
        return host

    def trust(self, address: str, port: int) -> None:
        """List the rig's host key for ``address:port`` in known_hosts (once)."""
        entry = f"[{address}]:{port}" if port != 22 else address
        line = f"{entry} {self.host_public}\n"
        if line not in self.known_hosts.read_text():
            with self.known_hosts.open("a") as f:
                f.write(line)

    def _script(self, config: Path, honest: bool, hostname: str) -> str:
        home = Path(os.path.expanduser("~root"))
        steps = [
            "set -e",
            f"[ -e {home}/.bashrc ] || touch {home}/.bashrc",
            f"mount --bind {self.bashrc} {home}/.bashrc",
        ]
        if honest:
            steps += [f"hostname {hostname}", "mount -t proc proc /proc"]
            # What must stay visible although it lives under /tmp: the rig's
            # folder (read-write), the interpreter and shoal's sources (read-only).
            keep: list[tuple[Path, bool]] = [(self.folder, False)]
            for path in {Path(sys.prefix).resolve(), Path(__file__).resolve().parents[1]}:
                keep.append((path, True))
            keep = [(p, ro) for p, ro in keep if _under(p, Path("/tmp"))]
            steps.append("mount -t tmpfs -o size=512m tmpfs /mnt")
            for i, (path, _) in enumerate(keep):
                steps += [f"mkdir -p /mnt/keep{i}", f"mount --bind {path} /mnt/keep{i}"]
            steps.append("mount -t tmpfs -o size=2g tmpfs /tmp")
            for i, (path, ro) in enumerate(keep):
                steps += [f"mkdir -p {path}", f"mount --bind /mnt/keep{i} {path}"]
                if ro:
                    steps.append(f"mount -o remount,bind,ro {path}")
            steps += [f"mkdir -p {home}/.cache", f"mount -t tmpfs -o size=2g tmpfs {home}/.cache"]
        steps.append(f"exec {SSHD} -D -e -f {config}")
        return "\n".join(steps)

    def _wait_listening(self, host: SSHHost) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if host.proc.poll() is not None:
                raise RuntimeError(
                    f"sshd for {host.spec} exited with {host.proc.returncode}:\n"
                    + host.log.read_text(errors="replace")
                )
            with contextlib.suppress(OSError), socket.create_connection((host.address, host.port), 0.5):
                return
            if time.monotonic() > deadline:
                host.stop()
                raise RuntimeError(f"sshd for {host.spec} did not listen within {START_TIMEOUT:g}s")
            time.sleep(0.02)

    # -- network namespaces ------------------------------------------------------

    def namespace_host(self, index: int) -> SSHHost:
        """An honest host in a network namespace of its own, at 10.200.N.2:22."""
        # Traffic to a host whose link is down must not follow the default
        # route off this machine: a covering route refuses it.  Left in
        # place if the run is killed (harmless), until the next rig's sweep.
        _run("ip", "route", "replace", "unreachable", FENCE)
        self._fence = True
        subnet = _free_subnet()
        ns = f"{NS_PREFIX}{os.getpid()}-{index}"
        veth = f"shr{os.getpid() % 100000}x{index}"[:15]
        peer = f"{veth[:13]}p"
        _run("ip", "netns", "del", ns, check=False)
        _run("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        bridge = self._bridge()
        _run("ip", "link", "del", veth, check=False)  # a leftover of a killed rig of this pid
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", peer)
        _run("ip", "link", "set", peer, "netns", ns)
        _run("ip", "link", "set", veth, "master", bridge)
        rig_end = f"10.200.{subnet}.1/24"
        _run("ip", "addr", "add", rig_end, "dev", bridge)
        _run("ip", "link", "set", veth, "up")
        _run("ip", "-n", ns, "addr", "add", f"10.200.{subnet}.2/24", "dev", peer)
        _run("ip", "-n", ns, "link", "set", peer, "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        # The other hosts' subnets are on the same bridge: reached directly
        # (ARP over the bridge), so nothing is forwarded by this machine.
        _run("ip", "-n", ns, "route", "add", FENCE, "dev", peer)
        host = self.start(honest=True, address=f"10.200.{subnet}.2", port=22, netns=ns,
                          hostname=f"h{index}")
        host.veth = veth
        host.rig_end = rig_end
        return host

    def _bridge(self) -> str:
        """The bridge of this rig's namespace hosts, made on first use."""
        if self.bridge is None:
            name = f"{BRIDGE_PREFIX}{os.getpid()}"
            _run("ip", "link", "del", name, check=False)
            _run("ip", "link", "add", name, "type", "bridge")
            _run("ip", "link", "set", name, "up")
            self.bridge = name
        return self.bridge

    def forget(self, host: SSHHost) -> None:
        """Stop a namespace host and remove its namespace and its address on the bridge."""
        if host.cut_how is not None:
            host.mend()
        host.stop()
        self.hosts.remove(host)
        if host.veth is not None:
            # Deleted here, at once: a namespace is torn down by the kernel
            # later, and its veth with it, so the next test's link of the
            # same name could find this one still there ("File exists").
            _run("ip", "link", "del", host.veth, check=False)
        if host.netns is not None:
            _run("ip", "netns", "del", host.netns, check=False)
            self.namespaces.remove(host.netns)
        if host.rig_end is not None and self.bridge is not None:
            _run("ip", "addr", "del", host.rig_end, "dev", self.bridge, check=False)

    def close(self) -> None:
        for host in self.hosts:
            host.stop()
        self.hosts.clear()
        for ns in self.namespaces:
            _run("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()
        if self.bridge is not None:
            _run("ip", "link", "del", self.bridge, check=False)
            self.bridge = None
        if self._fence:
            _run("ip", "route", "del", "unreachable", FENCE, check=False)
            self._fence = False


def _under(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _free_subnet() -> int:
    """A third octet N with no 10.200.N.0/24 address on this machine yet."""
    used = _run("ip", "-o", "-4", "addr", "show", check=False).stdout
    for n in range(1, 255):
        if f" 10.200.{n}." not in used:
            return n
    raise RuntimeError("every 10.200.N.0/24 subnet is in use")


def remove_stale_namespaces() -> None:
    """Delete the network namespaces and bridges of earlier rigs whose process is gone (and the fence, once none is left)."""
    listing = _run("ip", "netns", "list", check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(NS_PREFIX):
            continue
        owner = name[len(NS_PREFIX):].split("-")[0]
        if owner.isdigit() and int(owner) != os.getpid() and not Path(f"/proc/{owner}").exists():
            _run("ip", "netns", "del", name, check=False)
    for line in _run("ip", "-o", "link", "show", "type", "bridge", check=False).stdout.splitlines():
        words = line.split()
        name = words[1].rstrip(":") if len(words) > 1 else ""
        owner = name[len(BRIDGE_PREFIX):]
        if name.startswith(BRIDGE_PREFIX) and owner.isdigit() and int(owner) != os.getpid() \
                and not Path(f"/proc/{owner}").exists():
            _run("ip", "link", "del", name, check=False)
    if NS_PREFIX not in _run("ip", "netns", "list", check=False).stdout:
        _run("ip", "route", "del", "unreachable", FENCE, check=False)


def _need_sshd() -> None:
    if os.geteuid() != 0:
        missing("the SSH tests start sshd as root, and this is not root")
    if not Path(SSHD).exists():
        missing(f"no OpenSSH server at {SSHD} (apt-get install openssh-server)")
    if shutil.which("unshare") is None:
        missing("no unshare (util-linux) to give sshd a private mount namespace")


# -- what the fixtures of conftest.py do -------------------------------------------


def open_rig() -> Iterator[SSHRig]:
    """A rig for the test session, removed with everything it started."""
    _need_sshd()
    folder = Path(tempfile.mkdtemp(prefix="shoal-sshd-"))
    rig = SSHRig(folder)
    try:
        yield rig
    finally:
        rig.close()
        shutil.rmtree(folder, ignore_errors=True)


def namespace_hosts(rig: SSHRig, count: int = 4) -> Iterator[list[SSHHost]]:
    """``count`` honest hosts in network namespaces, removed afterwards (links mended first)."""
    if shutil.which("ip") is None:
        missing("no ip (iproute2) to make network namespaces")
    remove_stale_namespaces()
    probe = f"{NS_PREFIX}{os.getpid()}-probe"
    made = _run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        missing(f"network namespaces cannot be made here: {made.stderr.strip()}")
    _run("ip", "netns", "del", probe, check=False)
    hosts: list[SSHHost] = []
    try:
        for i in range(1, count + 1):
            hosts.append(rig.namespace_host(i))
        yield hosts
    finally:
        for host in hosts:
            rig.forget(host)

"""offload.SSH against real OpenSSH servers: options, host strings, trust, logins and lost hosts.

The servers come from ``_sshd`` (see its docstring): sshd on loopback,
an "honest" one that sees none of this machine's temporary files, and four
hosts in network namespaces whose links the tests take down.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import pytest

import _ssh_tasks as t
import _sshd
import engine
import offload
from engine import ConfigError
from engine.extend import BackendContext
from offload import AuthenticationFailed, Host, HostKeyError, HostLost
from offload._local import QUEUE
from offload._ssh import SSH, parse_host

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from _sshd import SSHHost, SSHRig
    from engine import Config


class Clock:
    """A monotonic clock that moves only when told (backoff without sleeping)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def target(rig: SSHRig, hosts: Sequence[str | Host], **options: object) -> SSH:
    options.setdefault("known_hosts", str(rig.known_hosts))
    options.setdefault("client_keys", [str(rig.client_key)])
    return SSH(list(hosts), **options)  # type: ignore[arg-type]


async def opened(backend: SSH, clock: Clock | None = None, home: Path | None = None) -> SSH:
    await backend.open(BackendContext(home=home or Path(os.devnull), monotonic=clock))
    return backend


def established(port: int) -> int:
    """This process's open TCP connections to ``port``."""
    return sum(
        1
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


# -- options and host strings (no server) ------------------------------------------


@pytest.mark.parametrize(
    ("text", "host"),
    [
        ("gpu1", Host("gpu1")),
        ("me@gpu2", Host("gpu2", username="me")),
        ("gpu2:2222", Host("gpu2", port=2222)),
        ("me@gpu2:2222", Host("gpu2", port=2222, username="me")),
        ("10.0.0.7:22", Host("10.0.0.7")),
        ("[::1]:2200", Host("::1", port=2200)),
        ("root@[fe80::1]", Host("fe80::1", username="root")),
        ("::1", Host("::1")),
        ("lab-box_3.example.org", Host("lab-box_3.example.org")),
    ],
)
def test_host_strings_are_read_as_ssh_writes_them(text: str, host: Host) -> None:
    assert parse_host(text) == host
    assert SSH([text], known_hosts="kh").hosts == (host,)


@pytest.mark.parametrize(
    "text",
    ["", " gpu1", "gpu 1", "me@", "@gpu1", "gpu1:", "gpu1:0", "gpu1:70000", "gpu1:ssh", "[::1",
     "[::1]x", "[gpu1]:22", "a/b", "me@gpu1:22:33", "-oProxyCommand=x"],
)
def test_a_host_string_that_does_not_parse_is_a_config_error_showing_the_forms(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        SSH([text], known_hosts="kh")
    message = str(caught.value)
    assert repr(text) in message
    assert "'user@name:port'" in message and "offload.Host(" in message


def test_known_hosts_none_is_refused_unless_the_insecure_flag_says_so() -> None:
    with pytest.raises(ConfigError, match="insecure_no_host_check=True"):
        SSH(["gpu1"], known_hosts=None)
    with pytest.raises(ConfigError, match="insecure_no_host_check=True"):
        SSH(["gpu1"], known_hosts=None, insecure_no_host_check="yes")  # type: ignore[arg-type]
    assert SSH(["gpu1"], known_hosts=None, insecure_no_host_check=True).known_hosts is None


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"hosts": []}, "non-empty list"),
        ({"hosts": ["gpu1", "gpu1:22"]}, "names gpu1:22 twice"),
        ({"hosts": [7]}, "host strings or offload.Host"),
        ({"workers": 0}, "workers= takes a whole number >= 1"),
        ({"retries": -1}, "retries= takes a whole number >= 0"),
        ({"concurrency": True}, "concurrency= takes a whole number"),
        ({"connect_timeout": 0}, "connect_timeout= takes a number of seconds > 0"),
        ({"keepalive_interval": -1.0}, "keepalive_interval="),
        ({"keepalive_count_max": 0}, "keepalive_count_max="),
        ({"env": {"1BAD": "x"}}, "env= takes a mapping"),
        ({"env": {"OK": 1}}, "env= takes a mapping"),
        ({"python": " "}, "python= takes a non-empty string"),
        ({"remote_dir": ""}, "remote_dir= takes a non-empty string"),
        ({"username": "a b"}, "username= takes a user name"),
        ({"client_keys": [""]}, "client_keys= takes a list of private key files"),
        ({"known_hosts": ""}, "known_hosts= takes the path"),
    ],
)
def test_bad_options_are_config_errors_naming_the_option(options: dict[str, object], words: str) -> None:
    options.setdefault("hosts", ["gpu1"])
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        SSH(**options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "words"),
    [({"name": "a b"}, "name="), ({"port": 0}, "port="), ({"workers": 0}, "workers="),
     ({"cpus": 0}, "cpus="), ({"gpus": -1}, "gpus=")],
)
def test_bad_host_fields_are_config_errors(options: dict[str, object], words: str) -> None:
    fields: dict[str, object] = {"name": "gpu1", **options}
    with pytest.raises(ConfigError, match=words):
        Host(**fields)  # type: ignore[arg-type]


def test_the_ssh_names_are_offloads_and_importing_them_loads_no_asyncssh() -> None:
    for name in ("SSH", "Host", "HostKeyError", "AuthenticationFailed", "HostLost"):
        assert name in offload.__all__
        value = getattr(offload, name)
        assert value.__module__ == "offload", name
        assert value.__doc__, name
    code = (
        "import sys, offload; lab = offload.SSH(['gpu1', 'me@gpu2:2222'], workers=2); "
        "print(lab.hosts[1], 'asyncssh' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["gpu2:2222", "False"]


def test_the_set_up_errors_keep_host_and_file_through_pickle_and_are_not_retried() -> None:
    import pickle

    from engine import OffloadError
    from engine.extend import InfrastructureError

    key = pickle.loads(pickle.dumps(HostKeyError("bad key", host="gpu1:22", known_hosts="/kh")))
    auth = pickle.loads(pickle.dumps(AuthenticationFailed("refused", host="gpu1:22", username="me")))
    assert (type(key), str(key), key.host, key.known_hosts) == (HostKeyError, "bad key", "gpu1:22", "/kh")
    assert (type(auth), str(auth), auth.host, auth.username) == (AuthenticationFailed, "refused", "gpu1:22", "me")
    for error in (key, auth):
        # Set up wrongly: an OffloadError that the engine does not retry.
        assert isinstance(error, OffloadError) and not isinstance(error, InfrastructureError)
    assert issubclass(HostLost, InfrastructureError)


# -- one loopback host ---------------------------------------------------------------


async def test_one_connection_per_host_opened_on_open_and_reused(sshd_rig: SSHRig, ssh_host: SSHHost) -> None:
    before = ssh_host.logins()
    backend = target(sshd_rig, [ssh_host.spec])
    assert ssh_host.logins() == before  # nothing happens until the target is opened
    async with backend:
        link = backend._link(ssh_host.spec)
        results = await asyncio.gather(*(link.run(f"echo {i}") for i in range(12)))
        again = await link.run("hostname")
        assert established(ssh_host.port) == 1
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(12)]
    assert again.exit_status == 0 and again.stdout.strip() == ssh_host.hostname
    assert ssh_host.logins() == before + 1
    assert link.connects == 1
    # aclose() closed it.
    assert established(ssh_host.port) == 0


async def test_an_honest_host_sees_none_of_this_machines_temporary_files(
    sshd_rig: SSHRig, honest_host: SSHHost, tmp_path: Path
) -> None:
    (tmp_path / "here.txt").write_text("only on the engine's machine")
    async with target(sshd_rig, [honest_host.spec]) as backend:
        link = backend._link(honest_host.spec)
        name = await link.run("hostname")
        seen = await link.run(f"test -e {tmp_path / 'here.txt'}")
        python = await link.run("python3 -c 'import offload, sys; print(sys.prefix)'")
    assert name.stdout.strip() == "honest"
    assert seen.exit_status == 1
    assert python.exit_status == 0, python.stderr
    assert python.stdout.strip() == sys.prefix


async def test_an_unknown_host_key_is_a_host_key_error_naming_host_and_file(
    sshd_rig: SSHRig, ssh_host: SSHHost, tmp_path: Path
) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(HostKeyError) as caught:
        async with target(sshd_rig, [ssh_host.spec], known_hosts=str(empty)):
            pass
    message = str(caught.value)
    assert f"127.0.0.1:{ssh_host.port}" in message and str(empty) in message
    assert f"ssh-keyscan -p {ssh_host.port} 127.0.0.1" in message
    assert caught.value.host == f"127.0.0.1:{ssh_host.port}"
    assert caught.value.known_hosts == str(empty)


async def test_a_changed_host_key_is_a_host_key_error(sshd_rig: SSHRig, ssh_host: SSHHost, tmp_path: Path) -> None:
    import asyncssh

    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[127.0.0.1]:{ssh_host.port} {other}\n")
    before = ssh_host.logins()
    with pytest.raises(HostKeyError, match=r"differs\s+from the key listed there"):
        async with target(sshd_rig, [ssh_host.spec], known_hosts=str(wrong)):
            pass
    assert ssh_host.logins() == before  # never logged in to a host it could not trust


async def test_a_missing_known_hosts_file_is_a_host_key_error_before_any_connect(
    sshd_rig: SSHRig, ssh_host: SSHHost, tmp_path: Path
) -> None:
    with pytest.raises(HostKeyError, match=r"known_hosts file .*nowhere.* does not exist"):
        async with target(sshd_rig, [ssh_host.spec], known_hosts=str(tmp_path / "nowhere")):
            pass


async def test_the_insecure_flag_connects_without_checking(sshd_rig: SSHRig, ssh_host: SSHHost) -> None:
    backend = target(sshd_rig, [ssh_host.spec], known_hosts=None, insecure_no_host_check=True)
    async with backend:
        result = await backend._link(ssh_host.spec).run("echo ok")
    assert result.stdout == "ok\n"


async def test_a_refused_client_key_is_an_authentication_error(
    sshd_rig: SSHRig, ssh_host: SSHHost, tmp_path: Path
) -> None:
    import asyncssh

    stranger = tmp_path / "stranger"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(stranger))
    with pytest.raises(AuthenticationFailed) as caught:
        async with target(sshd_rig, [f"root@{ssh_host.spec}"], client_keys=[str(stranger)]):
            pass
    message = str(caught.value)
    assert f"127.0.0.1:{ssh_host.port}" in message and "'root'" in message and str(stranger) in message
    assert "authorized_keys" in message
    assert caught.value.username == "root"


async def test_a_missing_or_unreadable_client_key_file_is_a_config_error(
    sshd_rig: SSHRig, ssh_host: SSHHost, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"names .*no-key, which does not exist"):
        async with target(sshd_rig, [ssh_host.spec], client_keys=[str(tmp_path / "no-key")]):
            pass
    garbage = tmp_path / "garbage"
    garbage.write_text("not a key\n")
    with pytest.raises(ConfigError, match=r"cannot read the client key .*garbage"):
        async with target(sshd_rig, [ssh_host.spec], client_keys=[str(garbage)]):
            pass


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_an_unreachable_host_is_host_lost_naming_it(sshd_rig: SSHRig) -> None:
    port = _closed_port()
    with pytest.raises(HostLost, match=rf"cannot connect to host 127.0.0.1:{port}: .*sshd\s+listens on port {port}"):
        async with target(sshd_rig, [f"127.0.0.1:{port}"]):
            pass


async def test_a_host_down_at_open_is_left_out_and_retried_after_its_backoff(
    sshd_rig: SSHRig, ssh_host: SSHHost
) -> None:
    port = _closed_port()
    sshd_rig.trust("127.0.0.1", port)
    clock = Clock()
    backend = await opened(target(sshd_rig, [ssh_host.spec, f"127.0.0.1:{port}"]), clock)
    try:
        good, dead = backend._link(ssh_host.spec), backend._link(f"127.0.0.1:{port}")
        assert good.up and not dead.up
        assert (await good.run("echo ok")).stdout == "ok\n"
        with pytest.raises(HostLost, match=rf"host 127.0.0.1:{port} is down \(cannot connect.*\); it is connected to again in (0\.9|1\.0|1\.1)s"):
            await dead.run("true")
        # The host comes up; it gets no work until the backoff has passed.
        late = sshd_rig.start(port=port)
        try:
            with pytest.raises(HostLost, match="is down"):
                await dead.run("true")
            assert late.logins() == 0
            clock.now = dead.down_until
            assert dead.up
            assert (await dead.run("echo back")).stdout == "back\n"
            assert late.logins() == 1 and dead.failures == 0
        finally:
            await backend.aclose()
            late.stop()
            sshd_rig.hosts.remove(late)
    finally:
        await backend.aclose()


async def test_backoff_doubles_while_a_host_stays_down(sshd_rig: SSHRig, ssh_host: SSHHost) -> None:
    port = _closed_port()
    clock = Clock()
    backend = await opened(target(sshd_rig, [ssh_host.spec, f"127.0.0.1:{port}"]), clock)
    try:
        dead = backend._link(f"127.0.0.1:{port}")
        waits = []
        for _ in range(8):
            waits.append(dead.down_until - clock.now)
            clock.now = dead.down_until
            with pytest.raises(HostLost, match="cannot connect"):
                await dead.connection()
        # Doubling up to a minute, each spread by up to 10% either way.
        for wait, base in zip(waits, [1, 2, 4, 8, 16, 32, 60, 60], strict=True):
            assert 0.9 * base <= wait <= 1.1 * base, waits
    finally:
        await backend.aclose()


async def test_a_connection_lost_under_a_command_is_host_lost_and_reported(sshd_rig: SSHRig) -> None:
    host = sshd_rig.start(honest=True, hostname="doomed")
    lost: list[str] = []
    try:
        backend = await opened(target(sshd_rig, [host.spec]), Clock())
        try:
            link = backend._link(host.spec)
            link.on_lost(lost.append)
            running = asyncio.ensure_future(link.run("sleep 60"))
            await asyncio.sleep(0.2)
            host.stop()  # the host dies (its sshd and everything it ran)
            with pytest.raises(HostLost, match=rf"host 127.0.0.1:{host.port}"):
                await running
            assert lost and not link.up
            with pytest.raises(HostLost, match="is down"):
                await link.run("true")
        finally:
            await backend.aclose()
    finally:
        host.stop()
        sshd_rig.hosts.remove(host)


# -- four hosts in network namespaces -------------------------------------------------


@pytest.mark.parametrize("how", ["down", pytest.param("drop", marks=pytest.mark.slow)])
async def test_a_host_whose_link_goes_away_mid_command_is_host_lost_and_the_others_carry_on(
    sshd_rig: SSHRig, ns_hosts: list[SSHHost], how: str
) -> None:
    clock = Clock()
    backend = await opened(
        target(sshd_rig, [h.spec for h in ns_hosts], keepalive_interval=0.3, keepalive_count_max=2), clock
    )
    try:
        links = [backend._link(h.spec) for h in ns_hosts]
        names = await asyncio.gather(*(link.run("hostname") for link in links))
        assert [n.stdout.strip() for n in names] == ["h1", "h2", "h3", "h4"]
        doomed = asyncio.ensure_future(links[0].run("sleep 60"))
        others = [asyncio.ensure_future(link.run("sleep 1; hostname")) for link in links[1:]]
        await asyncio.sleep(0.3)
        started = time.monotonic()
        ns_hosts[0].cut(how)
        with pytest.raises(HostLost, match=r"10\.200\.\d+\.2:22"):
            await doomed
        noticed = time.monotonic() - started
        assert [(await o).stdout.strip() for o in others] == ["h2", "h3", "h4"]
        assert not links[0].up
        assert all(link.up for link in links[1:])
        # Back once its link is and its backoff has passed: a new connection.
        ns_hosts[0].mend()
        with pytest.raises(HostLost, match="is down"):
            await links[0].run("hostname")
        clock.now = links[0].down_until
        assert (await links[0].run("hostname")).stdout.strip() == "h1"
        assert links[0].connects == 2
        # Keepalives noticed it (0.3 s x 2), long before TCP would have.
        assert noticed < 30
    finally:
        await backend.aclose()
    assert established(22) == 0


async def test_a_host_down_at_start_leaves_the_others_working(sshd_rig: SSHRig, ns_hosts: list[SSHHost]) -> None:
    ns_hosts[1].cut("down")
    clock = Clock()
    backend = await opened(target(sshd_rig, [h.spec for h in ns_hosts], connect_timeout=2.0), clock)
    try:
        links = [backend._link(h.spec) for h in ns_hosts]
        assert [link.up for link in links] == [True, False, True, True]
        names = await asyncio.gather(*(links[i].run("hostname") for i in (0, 2, 3)))
        assert [n.stdout.strip() for n in names] == ["h1", "h3", "h4"]
        ns_hosts[1].mend()
        clock.now = links[1].down_until
        assert (await links[1].run("hostname")).stdout.strip() == "h2"
    finally:
        await backend.aclose()


@pytest.mark.slow
async def test_when_no_host_can_be_reached_open_says_so_for_each(sshd_rig: SSHRig, ns_hosts: list[SSHHost]) -> None:
    for host in ns_hosts[:2]:
        host.cut("down")
    with pytest.raises(HostLost) as caught:
        await opened(target(sshd_rig, [h.spec for h in ns_hosts[:2]], connect_timeout=2.0))
    message = str(caught.value)
    assert "no host of offload.SSH" in message
    assert ns_hosts[0].address in message and ns_hosts[1].address in message


# -- config tables -------------------------------------------------------------------


def _lab_table(tmp_path: Path, body: str) -> tuple[str, Any, Config]:
    from engine._config import load_config

    file = tmp_path / "shoal.toml"
    file.write_text(f'[offload.lab]\nbackend = "ssh"\n{body}')
    config = load_config(file)
    return str(file), config.offload["lab"], config


async def test_a_config_table_with_backend_ssh_is_an_ssh_target_that_connects(
    sshd_rig: SSHRig, ssh_host: SSHHost, tmp_path: Path
) -> None:
    from engine._registry import build_target

    _, table, config = _lab_table(
        tmp_path,
        f'hosts = ["{ssh_host.spec}"]\nknown_hosts = "{sshd_rig.known_hosts}"\n'
        f'client_keys = ["{sshd_rig.client_key}"]\nworkers = 2\nkeepalive_interval = 1.5\n'
        'env = { OMP_NUM_THREADS = "1" }\nranks_per_host = 2\n',
    )
    lab = build_target("lab", table, config)
    assert isinstance(lab, offload.SSH)
    assert lab.hosts == (parse_host(ssh_host.spec),)
    assert (lab.workers, lab.keepalive_interval, lab.env) == (2, 1.5, {"OMP_NUM_THREADS": "1"})
    assert lab.known_hosts == str(sshd_rig.known_hosts) and lab.retries == 3 and lab.ranks_per_host == 2
    async with lab:
        assert (await lab._link(ssh_host.spec).run("echo from-config")).stdout == "from-config\n"


def test_a_bad_host_in_a_config_table_names_the_target_the_file_and_the_host(tmp_path: Path) -> None:
    from engine._registry import build_target

    file, table, config = _lab_table(tmp_path, 'hosts = ["gpu1", "me@gpu2:port"]\n')
    with pytest.raises(ConfigError) as caught:
        build_target("lab", table, config)
    message = str(caught.value)
    assert "offload target 'lab'" in message and file in message and "'me@gpu2:port'" in message


def test_a_config_table_without_host_checks_is_refused_unless_it_says_insecure(tmp_path: Path) -> None:
    from engine._registry import build_target

    with pytest.raises(ConfigError, match="insecure_no_host_check"):
        _lab_table(tmp_path, 'hosts = ["gpu1"]\nknown_hosts = ""\n')
    _, table, config = _lab_table(tmp_path, 'hosts = ["gpu1"]\nknown_hosts = ""\ninsecure_no_host_check = true\n')
    lab = build_target("lab", table, config)
    assert lab.known_hosts is None and lab.insecure_no_host_check is True


# -- what open() checks on each host ------------------------------------------------------


async def test_open_probes_each_host_for_its_interpreter_shoal_cpus_and_folder(
    sshd_rig: SSHRig, honest_host: SSHHost
) -> None:
    from engine.extend import VERSION, usable_cpus

    async with target(sshd_rig, [honest_host.spec], workers=3, concurrency=2) as backend:
        facts = backend._link(honest_host.spec).facts
        assert backend.capacity() == 3 * (2 + QUEUE)  # each worker may hold QUEUE more, pipelined
    assert facts is not None
    assert (facts.hostname, facts.shoal) == ("honest", VERSION)
    assert Path(facts.executable).parent == Path(sys.executable).parent  # python3 from PATH
    import pwd

    assert facts.dir == f"{pwd.getpwuid(os.getuid()).pw_dir}/.cache/shoal"
    assert facts.cpus == usable_cpus()  # the same machine underneath


async def test_capacity_defaults_to_each_hosts_cpus_and_unfit_names_every_host(
    sshd_rig: SSHRig, ssh_host: SSHHost, honest_host: SSHHost
) -> None:
    from engine.extend import usable_cpus

    hosts: list[str | Host] = [Host("127.0.0.1", port=ssh_host.port, cpus=64, gpus=2), honest_host.spec]
    async with target(sshd_rig, hosts) as backend:
        assert backend.capacity() == (64 + usable_cpus()) * (1 + QUEUE)
        assert backend.unfit(64, 2) is None
        assert backend.unfit(1, 0) is None
        why = backend.unfit(65, 3)
    assert why is not None
    assert f"127.0.0.1:{ssh_host.port} has 64 CPUs and 2 GPUs" in why
    assert f"127.0.0.1:{honest_host.port} has {usable_cpus()} CPUs and 0 GPUs" in why


@pytest.fixture
def plain_python() -> Path:
    """The system's interpreter, which has no shoal (skip where it is missing or has one)."""
    plain = Path("/usr/bin/python3")
    found = subprocess.run([str(plain), "-c", "import engine"], capture_output=True, check=False) if plain.exists() else None
    if found is None or found.returncode == 0:
        _sshd.missing(f"{plain} is missing or has shoal installed: no interpreter without shoal here")
    return plain


async def test_a_remote_interpreter_without_shoal_says_which_host_which_interpreter_and_what_to_install(
    sshd_rig: SSHRig, honest_host: SSHHost, plain_python: Path
) -> None:
    plain = plain_python
    from engine import OffloadError

    with pytest.raises(OffloadError) as caught:
        async with target(sshd_rig, [honest_host.spec], python=str(plain)):
            pass
    message = str(caught.value)
    assert f"host 127.0.0.1:{honest_host.port}" in message
    assert f"the interpreter '{plain}'" in message and "does not have shoal installed" in message
    assert "-m pip install shoal==" in message


async def test_a_missing_remote_interpreter_is_named(sshd_rig: SSHRig, honest_host: SSHHost) -> None:
    from engine import OffloadError

    with pytest.raises(OffloadError, match=r"there is no interpreter '/opt/none/python3'.*python= the path"):
        async with target(sshd_rig, [honest_host.spec], python="/opt/none/python3"):
            pass


async def test_another_remote_shoal_version_names_both_versions(
    sshd_rig: SSHRig, ssh_host: SSHHost, tmp_path: Path
) -> None:
    from engine import OffloadError
    from engine.extend import VERSION

    # Another shoal's metadata first on the host's sys.path (the loopback host shares this folder).
    other = tmp_path / "other"
    (other / "shoal-0.0.1.dist-info").mkdir(parents=True)
    (other / "shoal-0.0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: shoal\nVersion: 0.0.1\n")
    with pytest.raises(OffloadError) as caught:
        async with target(sshd_rig, [ssh_host.spec], env={"PYTHONPATH": str(other)}):
            pass
    message = str(caught.value)
    assert f"host 127.0.0.1:{ssh_host.port}" in message
    assert f"has shoal 0.0.1 and this engine runs shoal {VERSION}" in message
    assert f"pip install shoal=={VERSION}" in message


async def test_through_an_engine_a_host_set_up_wrongly_says_what_the_probe_says(
    sshd_rig: SSHRig, ssh_host: SSHHost, tmp_path: Path
) -> None:
    # An engine's open learns of a host from its first worker's hello; when
    # that worker cannot start, the probe says why, as for a target opened alone.
    from engine.extend import VERSION

    other = tmp_path / "other"
    (other / "shoal-0.0.1.dist-info").mkdir(parents=True)
    (other / "shoal-0.0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: shoal\nVersion: 0.0.1\n")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"python": "/opt/none/python3"}, "there is no interpreter '/opt/none/python3'"),
        ({"env": {"PYTHONPATH": str(other)}}, f"has shoal 0.0.1 and this engine runs shoal {VERSION}"),
        ({"remote_dir": "/proc/shoal"}, "remote_dir='/proc/shoal' cannot be used"),
    ]
    for options, words in cases:
        backend = target(sshd_rig, [ssh_host.spec], **options)
        async with engine.Engine(home=tmp_path / "home", targets={"lab": backend}) as eng:
            run = await eng.run(t.where, 1)
        assert run.status == "failed", options
        assert isinstance(run.error, engine.OffloadError), run.error
        assert words in str(run.error) and f"host 127.0.0.1:{ssh_host.port}" in str(run.error)


@pytest.mark.parametrize("folder", ["/proc/shoal", "/etc/hostname/shoal"])
async def test_an_unusable_remote_dir_is_refused_naming_host_and_folder(
    sshd_rig: SSHRig, honest_host: SSHHost, folder: str
) -> None:
    from engine import OffloadError

    with pytest.raises(OffloadError) as caught:
        async with target(sshd_rig, [honest_host.spec], remote_dir=folder):
            pass
    message = str(caught.value)
    assert f"host 127.0.0.1:{honest_host.port}: remote_dir={folder!r} cannot be used" in message
    assert "give offload.SSH remote_dir= a folder" in message


# -- the code bundle ------------------------------------------------------------------------


async def test_a_code_bundle_goes_to_a_host_once_even_across_runs(
    sshd_rig: SSHRig, honest_host: SSHHost, tmp_path: Path
) -> None:
    import uuid

    from offload._bundle import build_bundle

    project = tmp_path / "project"
    project.mkdir()
    marker = uuid.uuid4().hex
    (project / "flow.py").write_text(f"MARKER = {marker!r}\n")
    bundle = build_bundle(project, dest=tmp_path / "bundles")
    async with target(sshd_rig, [honest_host.spec]) as first:
        link = first._link(honest_host.spec)
        sent = await asyncio.gather(*(link.bundle(bundle.digest, bundle.path) for _ in range(5)))
        assert link.uploads == 1 and sent == [True] * 5
        assert link.facts is not None
        folder = f"{link.facts.dir}/bundles/{bundle.digest}"
        content = await link.run(f"cat {folder}/flow.py")
        inode = await link.run(f"stat -c %i {folder}")
        beside = await link.run(f"ls -a {link.facts.dir}")
    assert content.stdout == f"MARKER = {marker!r}\n"
    # Nothing half-sent is left beside the bundles.
    assert not [name for name in beside.stdout.split() if name.startswith(".bundle-")]
    # The next run (a new target object, a new connection) sends nothing.
    async with target(sshd_rig, [honest_host.spec]) as second:
        link = second._link(honest_host.spec)
        assert await link.bundle(bundle.digest, bundle.path) is False
        assert link.uploads == 0
        again = await link.run(f"stat -c %i {folder}")
    assert again.stdout == inode.stdout  # the same folder, not unpacked again


async def test_opening_an_open_target_again_keeps_its_one_connection(sshd_rig: SSHRig, ssh_host: SSHHost) -> None:
    before = ssh_host.logins()
    async with target(sshd_rig, [ssh_host.spec]) as backend:
        link = backend._link(ssh_host.spec)
        await opened(backend)
        assert backend._link(ssh_host.spec) is link
        assert (await link.run("echo one")).stdout == "one\n"
    assert ssh_host.logins() == before + 1


# -- the rig itself ------------------------------------------------------------------------

_KILLED_RIG = """
import sys, tempfile, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import _sshd
rig = _sshd.SSHRig(Path(tempfile.mkdtemp(prefix="shoal-sshd-")))
host = rig.namespace_host(1)
print(host.pid, host.netns, rig.bridge, flush=True)
time.sleep(60)
"""


@pytest.mark.slow
def test_a_killed_test_run_leaves_no_server_and_its_namespace_goes_at_the_next_start(
    sshd_rig: SSHRig, tmp_path: Path
) -> None:
    import shutil
    import signal

    import _sshd

    if shutil.which("ip") is None:
        _sshd.missing("no ip (iproute2) to make network namespaces")
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_RIG, str(Path(__file__).parent)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    with child.stdout:
        pid, netns, bridge = child.stdout.readline().split()
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    deadline = time.monotonic() + 10
    while psutil.pid_exists(int(pid)) and psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the server outlived the test run that started it"
        time.sleep(0.05)
    assert netns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    _sshd.remove_stale_namespaces()
    assert netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert bridge not in subprocess.run(["ip", "link", "show"], capture_output=True, text=True).stdout
    assert _sshd.FENCE not in subprocess.run(["ip", "route"], capture_output=True, text=True).stdout


# -- processes started on a host --------------------------------------------------------------


def _gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


async def _until_gone(pid: int) -> bool:
    for _ in range(100):
        if _gone(pid):
            return True
        await asyncio.sleep(0.05)
    return False


async def test_a_spawned_command_leads_its_group_and_kill_group_ends_it_and_its_children(
    sshd_rig: SSHRig, ssh_host: SSHHost
) -> None:
    async with target(sshd_rig, [ssh_host.spec]) as backend:
        link = backend._link(ssh_host.spec)
        process, pid = await link.spawn("sh -c 'sleep 600 & echo $!; wait'")
        child = int(await process.stdout.readline())
        # The loopback host shares this machine's processes: look at them directly.
        assert os.getpgid(pid) == pid and os.getpgid(child) == pid
        assert psutil.Process(pid).environ()["SHOAL_SSH_OWNER"] == backend.token
        await link.kill_group(pid)
        assert await _until_gone(pid) and await _until_gone(child)
        await process.wait()
        # The connection is still good for the next command.
        assert (await link.run("echo alive")).stdout == "alive\n"


async def test_aclose_kills_every_process_the_target_started(sshd_rig: SSHRig, ssh_host: SSHHost) -> None:
    backend = await opened(target(sshd_rig, [ssh_host.spec]))
    link = backend._link(ssh_host.spec)
    pids = [(await link.spawn("sleep 600"))[1] for _ in range(3)]
    assert not any(_gone(pid) for pid in pids)
    await backend.aclose()
    assert all([await _until_gone(pid) for pid in pids])


async def test_a_command_that_cannot_start_is_an_offload_error_naming_the_host(
    sshd_rig: SSHRig, ssh_host: SSHHost
) -> None:
    from engine import OffloadError

    async with target(sshd_rig, [ssh_host.spec]) as backend:
        link = backend._link(ssh_host.spec)
        backend.remote_dir = "/proc/nowhere"  # the folder went away after the open
        with pytest.raises(OffloadError, match=rf"host 127.0.0.1:{ssh_host.port} did not start 'sleep 1'.*remote_dir"):
            await link.spawn("sleep 1")


async def test_after_a_reconnect_what_the_lost_connection_started_is_killed(
    sshd_rig: SSHRig, ns_host: SSHHost
) -> None:
    clock = Clock()
    host = ns_host
    backend = await opened(target(sshd_rig, [host.spec], keepalive_interval=0.3, keepalive_count_max=2), clock)
    try:
        link = backend._link(host.spec)
        _, pid = await link.spawn("sleep 600")
        assert (await link.run(f"kill -0 {pid} && echo running")).stdout == "running\n"
        host.cut("down")
        with pytest.raises(HostLost):
            await link.run("sleep 60")
        host.mend()
        clock.now = link.down_until
        # The first command over the new connection finds the old process gone.
        # (Killed, it may stay a zombie for a moment, until its sshd reaps it.)
        check = await link.run(
            f"for i in $(seq 100); do case $(ps -o stat= -p {pid}) in ''|Z*) echo gone; exit;; esac; "
            f"sleep 0.05; done; echo running"
        )
        assert check.stdout == "gone\n"
        assert link.connects == 2
    finally:
        await backend.aclose()


# -- attempts through the engine ----------------------------------------------------------


def lab(rig: SSHRig, hosts: Sequence[SSHHost], **options: object) -> offload.SSH:
    """The target "lab" of the engine tests: ``hosts`` of the rig."""
    return target(rig, [h.spec for h in hosts], **options)


@pytest.fixture
async def lab_engine(sshd_rig: SSHRig, honest_host: SSHHost, tmp_path: Path) -> AsyncIterator[engine.Engine]:
    """A journaled engine whose target "lab" is the honest host, with two workers."""
    async with engine.Engine(home=tmp_path / "home", targets={"lab": lab(sshd_rig, [honest_host], workers=2)}) as eng:
        yield eng


async def test_an_action_sent_over_ssh_runs_on_the_host_and_says_where(lab_engine: engine.Engine) -> None:
    run = await lab_engine.run(t.where, 21)
    assert run.status == "succeeded", run.error
    value, pid, hostname = run.result
    assert (value, hostname) == (42, "honest") and pid != os.getpid()
    shown = await lab_engine.get_run(run.id, actions=True)
    [action] = [a for a in shown.action_records if a.task == "where"]
    [attempt] = action.attempts
    assert (attempt.state, attempt.target, attempt.backend, attempt.where) == ("succeeded", "lab", "ssh", f"honest:{pid}")
    # Opened by the engine: what the host is came from its first worker's hello.
    from engine.extend import VERSION, usable_cpus

    facts = lab_engine.targets["lab"]._links[0].facts
    assert facts is not None
    assert (facts.hostname, facts.shoal, facts.cpus, facts.gpus) == ("honest", VERSION, usable_cpus(), 0)
    assert facts.dir.endswith("/.cache/shoal") and Path(facts.executable).parent == Path(sys.executable).parent


async def test_an_ssh_actions_exception_keeps_its_type_and_remote_traceback_and_its_output_comes_back(
    lab_engine: engine.Engine, tmp_path: Path
) -> None:
    import json

    from typer.testing import CliRunner

    from engine._cli import build_app

    run = await lab_engine.run(t.call_unlucky, 7)
    assert run.status == "failed"
    assert type(run.error) is t.Unlucky and str(run.error) == "no luck 7"
    assert "raise Unlucky" in str(run.error.__cause__) and "honest:" in str(run.error.__cause__)
    said = await lab_engine.run(t.call_chatty, 5)
    assert said.result == 5
    # The CLI runs its own loop: in a thread, as from another terminal.
    shown = await asyncio.to_thread(
        CliRunner().invoke, build_app(), ["logs", said.id, "--json"], env={"SHOAL_HOME": str(tmp_path / "home")}
    )
    assert shown.exit_code == 0, shown.output
    seen = {(line["stream"], line["text"]) for line in json.loads(shown.stdout) if line["task"] == "chatty"}
    assert ("stdout", "printed 5") in seen
    assert any(stream == "log" and "logged 5" in text for stream, text in seen)


async def test_a_hundred_tiny_actions_reuse_the_warm_workers(lab_engine: engine.Engine) -> None:
    run = await lab_engine.run(t.many, 100)
    assert run.status == "succeeded", run.error
    assert [value for value, _ in run.result] == [i * i for i in range(100)]
    pids = {pid for _, pid in run.result}
    assert 1 <= len(pids) <= 2
    again = await lab_engine.run(t.many, 10)
    assert {pid for _, pid in again.result} <= pids  # still warm for the next run


async def test_cancelling_an_ssh_action_kills_its_remote_process_group(
    lab_engine: engine.Engine, honest_host: SSHHost
) -> None:
    import uuid

    pidfile = f"/tmp/hangs-{uuid.uuid4().hex}"  # on the host (its own /tmp)
    backend = lab_engine.targets["lab"]
    run = await lab_engine.submit(t.call_hangs, pidfile)

    async def pids() -> list[int]:
        if not backend._links:
            return []  # the engine has not opened its target yet
        done = await backend._link(honest_host.spec).run(f"cat {pidfile} 2>/dev/null")
        return [int(p) for p in done.stdout.split()]

    for _ in range(400):
        if await pids():
            break
        await asyncio.sleep(0.05)
    link = backend._link(honest_host.spec)
    worker, child = await pids()
    # A fresh command on the host sees both running.
    assert (await link.run(f"kill -0 {worker} {child} && echo running")).stdout == "running\n"
    run.cancel()
    await run.wait()
    assert run.status == "cancelled"
    check = await link.run(
        f"for i in $(seq 200); do kill -0 {worker} 2>/dev/null || kill -0 {child} 2>/dev/null || "
        f"{{ echo gone; exit; }}; sleep 0.05; done; echo running"
    )
    assert check.stdout == "gone\n"
    shown = await lab_engine.get_run(run.id, actions=True)
    [action] = [a for a in shown.action_records if a.task == "hangs"]
    assert action.state == "cancelled" and action.attempts[-1].state == "cancelled"
    # The next action gets a fresh worker.
    assert (await lab_engine.run(t.where, 1)).status == "succeeded"


async def test_a_worker_killed_on_its_host_is_worker_lost_and_replaced(
    lab_engine: engine.Engine, honest_host: SSHHost
) -> None:
    import uuid

    marker = f"/tmp/dies-{uuid.uuid4().hex}"  # on the host (its own /tmp)
    backend = lab_engine.targets["lab"]
    run = await lab_engine.submit(t.call_dies_once, marker)
    first = ""
    for _ in range(400):
        if backend._links:
            first = (await backend._link(honest_host.spec).run(f"cat {marker} 2>/dev/null")).stdout.strip()
            if first:
                break
        await asyncio.sleep(0.05)
    assert first
    await backend._link(honest_host.spec).run(f"kill -KILL {first}")
    await run.wait()
    assert (run.status, run.result) == ("succeeded", 2)  # dies_once has no retries of its own
    shown = await lab_engine.get_run(run.id, actions=True)
    [action] = [a for a in shown.action_records if a.task == "dies_once"]
    assert [(a.attempt, a.state) for a in action.attempts] == [(1, "lost"), (1, "succeeded")]
    assert action.attempts[0].where == f"honest:{first}" and action.attempts[1].where != action.attempts[0].where
    assert run.stats["retries"] == 1


async def test_a_gpu_request_no_host_can_give_is_a_resource_error_at_once(lab_engine: engine.Engine) -> None:
    run = await lab_engine.run(t.call_on_gpu)
    assert run.status == "failed"
    assert isinstance(run.error, engine.ResourceError)
    assert "gpu=1" in str(run.error) and "0 GPUs" in str(run.error) and "'lab'" in str(run.error)
    shown = await lab_engine.get_run(run.id, actions=True)
    [action] = [a for a in shown.action_records if a.task == "on_gpu"]
    assert [a.backend for a in action.attempts] == ["in-process"]  # failed here: nothing was sent


async def test_a_gpu_attempt_sees_the_gpus_it_holds(sshd_rig: SSHRig, honest_host: SSHHost, tmp_path: Path) -> None:
    # Host(gpus=) gives the slots; each attempt holds one and is told which.
    host = Host("127.0.0.1", port=honest_host.port, gpus=2)
    backend = target(sshd_rig, [host], workers=2)
    async with engine.Engine(home=tmp_path / "home", targets={"lab": backend}) as eng:
        first, second = await asyncio.gather(eng.run(t.call_on_gpu), eng.run(t.call_on_gpu))
    assert first.status == second.status == "succeeded"
    assert {first.result, second.result} <= {"0", "1"}


@pytest.mark.slow
async def test_a_host_lost_mid_run_has_its_attempts_retried_elsewhere_and_leaves_no_worker(
    sshd_rig: SSHRig, ns_hosts: list[SSHHost], tmp_path: Path
) -> None:
    backend = lab(sshd_rig, ns_hosts, workers=2, keepalive_interval=0.3, keepalive_count_max=2, retries=5)
    async with engine.Engine(home=tmp_path / "home", targets={"lab": backend}) as eng:
        run = await eng.submit(t.spread, 24, 1.5)
        for _ in range(400):
            if backend._links:  # opened by the engine
                break
            await asyncio.sleep(0.05)
        link = backend._link(ns_hosts[0].spec)
        def running() -> bool:
            # Attempts sent to h1's workers, its code bundle unpacked there.
            bundles = list(link._bundles.values())
            return bool(bundles) and all(b.done() for b in bundles) and any(w.in_flight for w in link.workers)

        for _ in range(400):
            if running():
                break
            await asyncio.sleep(0.05)
        assert running()
        await asyncio.sleep(0.2)
        ns_hosts[0].cut("down")
        await run.wait()
        assert run.status == "succeeded", run.error
        assert [value for value, _ in run.result] == [i + 1 for i in range(24)]
        shown = await eng.get_run(run.id, actions=True)
        attempts = [a for r in shown.action_records if r.task == "slow" for a in r.attempts]
        lost = [a for a in attempts if a.state == "lost"]
        assert lost and all(a.where.startswith("h1:") for a in lost)
        assert {a.where.split(":")[0] for a in attempts if a.state == "succeeded"} >= {"h2", "h3", "h4"}
        ns_hosts[0].mend()
    # After aclose: no worker on any host (h1's, cut off, was killed over a new connection).
    async with target(sshd_rig, [h.spec for h in ns_hosts]) as check:
        left = await asyncio.gather(
            *(check._link(h.spec).run("pgrep -f 'offload[.]worker' || true") for h in ns_hosts)
        )
    assert [r.stdout.strip() for r in left] == ["", "", "", ""]


async def test_closing_the_engine_while_its_target_opens_and_runs_leaves_no_worker(
    sshd_rig: SSHRig, honest_host: SSHHost, tmp_path: Path
) -> None:
    backend = lab(sshd_rig, [honest_host], workers=2)
    for delay in (0.0, 0.3, 1.0):
        eng = engine.Engine(home=tmp_path / f"home-{delay}", targets={"lab": backend})
        await eng.__aenter__()
        run = await eng.submit(t.spread, 4, 30.0)
        await asyncio.sleep(delay)
        await asyncio.wait_for(eng.aclose(), 30)
        assert run.done and run.status == "cancelled"
        assert not backend._links and not backend._attempts
    async with target(sshd_rig, [honest_host.spec]) as check:
        left = await check._link(honest_host.spec).run("pgrep -f 'offload[.]worker' || true")
    assert left.stdout.strip() == ""


@pytest.mark.slow
async def test_a_host_down_at_start_gets_no_work_and_the_run_succeeds_on_the_others(
    sshd_rig: SSHRig, ns_hosts: list[SSHHost], tmp_path: Path
) -> None:
    ns_hosts[0].cut("down")
    backend = lab(sshd_rig, ns_hosts, workers=1, connect_timeout=2.0)
    async with engine.Engine(home=tmp_path / "home", targets={"lab": backend}) as eng:
        run = await eng.run(t.spread, 9, 0.1)
        assert run.status == "succeeded", run.error
        assert [value for value, _ in run.result] == [i + 1 for i in range(9)]
        assert {name for _, name in run.result} == {"h2", "h3", "h4"}
        shown = await eng.get_run(run.id, actions=True)
        attempts = [a for r in shown.action_records if r.task == "slow" for a in r.attempts]
        assert all(a.state == "succeeded" and not a.where.startswith("h1:") for a in attempts)

"""Offload targets named in config: typed tables, and the errors that name file, table and key."""

from __future__ import annotations

import re
import sys
from typing import TYPE_CHECKING

import msgspec
import pytest

import engine
from engine._config import BatchTarget, LocalTarget, SSHTarget, load_config

if TYPE_CHECKING:
    from pathlib import Path


def _pyproject(folder: Path, body: str) -> Path:
    path = folder / "pyproject.toml"
    path.write_text(f'[project]\nname = "flow"\n\n{body}\n')
    return path


def test_a_table_of_each_backend_becomes_its_typed_target(tmp_path: Path) -> None:
    _pyproject(
        tmp_path,
        """
[tool.shoal.offload.box]
backend = "local"
workers = 4
env = {OMP_NUM_THREADS = "1"}

[tool.shoal.offload.lab]
backend = "ssh"
hosts = ["gpu1", "me@gpu2:2222"]
workers = 2
connect_timeout = 3
client_keys = ["~/.ssh/id_lab"]

[tool.shoal.offload.aws]
backend = "batch"
job_queue = "gpu-queue"
image = "123.dkr.ecr.eu-west-1.amazonaws.com/app:1"
storage = "s3://bucket/shoal"
max_array_size = 500
""",
    )
    config = engine.Engine(store="memory").config
    assert config.offload == {
        "box": LocalTarget(workers=4, env={"OMP_NUM_THREADS": "1"}),
        "lab": SSHTarget(hosts=["gpu1", "me@gpu2:2222"], workers=2, connect_timeout=3.0,
                         client_keys=["~/.ssh/id_lab"]),
        "aws": BatchTarget(job_queue="gpu-queue", image="123.dkr.ecr.eu-west-1.amazonaws.com/app:1",
                           storage="s3://bucket/shoal", max_array_size=500),
    }
    box, lab, aws = (config.offload[name] for name in ("box", "lab", "aws"))
    assert isinstance(box, LocalTarget) and isinstance(lab, SSHTarget) and isinstance(aws, BatchTarget)
    # The defaults are the backends' own ("" for the interpreter running shoal).
    assert (box.python, box.retries, box.concurrency) == ("", 3, 1)
    assert (lab.python, lab.known_hosts, lab.keepalive_interval) == ("python3", "~/.ssh/known_hosts", 5.0)
    assert (aws.python, aws.array, aws.poll_interval) == ("python", True, 5.0)
    # The constructor's keyword arguments: what the table set, nothing else.
    assert box.options() == {"workers": 4, "env": {"OMP_NUM_THREADS": "1"}}
    assert lab.options() == {
        "hosts": ["gpu1", "me@gpu2:2222"], "workers": 2, "connect_timeout": 3.0, "client_keys": ["~/.ssh/id_lab"],
    }
    assert aws.options() == {
        "job_queue": "gpu-queue", "image": "123.dkr.ecr.eu-west-1.amazonaws.com/app:1",
        "storage": "s3://bucket/shoal", "max_array_size": 500,
    }
    assert [t.backend for t in (box, lab, aws)] == ["local", "ssh", "batch"]
    assert config.target_table("lab") == f"[tool.shoal.offload.lab] in {tmp_path / 'pyproject.toml'}"
    # Tagged by backend, the targets go back to the table they came from.
    assert msgspec.to_builtins(box) == {
        "backend": "local", "workers": 4, "python": "", "env": {"OMP_NUM_THREADS": "1"}, "retries": 3,
        "concurrency": 1,
    }


def test_shoal_toml_names_its_tables_offload_dot_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "shoal.toml").write_text(
        'max_concurrency = 8\n\n[offload.cpu-box]\nbackend = "local"\npython = "/opt/py/bin/python"\n'
        '\n[offload."odd.name"]\nbackend = "local"\n'
    )
    project = tmp_path / "sub"
    project.mkdir()
    monkeypatch.chdir(project)  # found from a subfolder, upwards
    config = load_config()
    assert config.max_concurrency == 8
    assert config.offload == {"cpu-box": LocalTarget(python="/opt/py/bin/python"), "odd.name": LocalTarget()}
    assert config.offload["cpu-box"].options() == {"python": "/opt/py/bin/python"}
    assert config.target_table("cpu-box") == f"[offload.cpu-box] in {tmp_path / 'shoal.toml'}"
    assert config.target_table("odd.name").startswith('[offload."odd.name"] in ')


def test_a_file_named_by_shoal_config_takes_the_shoal_toml_form(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "targets.toml"
    path.write_text('[offload.gpu]\nbackend = "ssh"\nhosts = ["gpu1"]\nworkers = "two"\n')
    monkeypatch.setenv("SHOAL_CONFIG", str(path))
    with pytest.raises(engine.ConfigError) as caught:
        engine.Engine(store="memory")
    assert str(caught.value) == (
        f"config file {path}: [offload.gpu]: invalid workers = 'two': Expected `int | null`, got `str`; "
        f"fix it there"
    )


def test_ssh_without_host_checks_must_say_so_twice(tmp_path: Path) -> None:
    _pyproject(
        tmp_path,
        '[tool.shoal.offload.lab]\nbackend = "ssh"\nhosts = ["h"]\nknown_hosts = ""\n'
        "insecure_no_host_check = true\n",
    )
    lab = load_config().offload["lab"]
    assert lab.options() == {"hosts": ["h"], "known_hosts": None, "insecure_no_host_check": True}


SSH_KEYS = (
    "backend, hosts, known_hosts, client_keys, username, workers, python, remote_dir, env, "
    "connect_timeout, keepalive_interval, keepalive_count_max, retries, insecure_no_host_check, concurrency, ranks_per_host"
)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('backend = "ssh"\nhost = ["gpu1"]',
         f"unknown key 'host' for backend 'ssh'. Did you mean 'hosts'? Its keys are: {SSH_KEYS}; fix it there"),
        ('backend = "local"\nhosts = ["gpu1"]',
         "unknown key 'hosts' for backend 'local'. Its keys are: backend, workers, python, env, retries, "
         "concurrency; fix it there"),
        ('backend = "sssh"\nhosts = ["gpu1"]',
         "unknown backend 'sssh'. Did you mean 'ssh'? Backends are: local, ssh, batch; fix it there"),
        ("backend = 2", "unknown backend 2. Backends are: local, ssh, batch"),
        ('hosts = ["gpu1"]',
         'has no backend key; say which backend runs this target: backend = "local" | "ssh" | "batch"'),
        ('backend = "local"\nworkers = "2"', "invalid workers = '2': Expected `int`, got `str`; fix it there"),
        ('backend = "local"\nworkers = 0', "invalid workers = 0: Expected `int` >= 1"),
        ('backend = "local"\nretries = -1', "invalid retries = -1: Expected `int` >= 0"),
        ('backend = "local"\nconcurrency = 0', "invalid concurrency = 0: Expected `int` >= 1"),
        ('backend = "local"\nenv = {A = 1}', "invalid env = {'A': 1}: Expected `str`, got `int` (at env[...])"),
        ('backend = "local"\nenv = {"NOT OK" = "1"}', "invalid key in env = {'NOT OK': '1'}: Expected `str` matching"),
        ('backend = "ssh"', "missing key 'hosts', which a 'ssh' target needs"),
        ('backend = "ssh"\nhosts = []', "invalid hosts = []: Expected `array` of length >= 1"),
        ('backend = "ssh"\nhosts = ["gpu1", 2]',
         "invalid hosts = ['gpu1', 2]: Expected `str`, got `int` (at hosts[1])"),
        ('backend = "ssh"\nhosts = ["h"]\nconnect_timeout = 0', "invalid connect_timeout = 0: Expected `float` > 0"),
        ('backend = "ssh"\nhosts = ["h"]\nkeepalive_count_max = 0', "invalid keepalive_count_max = 0: Expected `int` >= 1"),
        ('backend = "ssh"\nhosts = ["h"]\nknown_hosts = ""',
         'known_hosts = "" turns host key checks off; name a known_hosts file, or say '
         "insecure_no_host_check = true as well"),
        ('backend = "ssh"\nhosts = ["h"]\ninsecure_no_host_check = "yes"',
         "invalid insecure_no_host_check = 'yes': Expected `bool`, got `str`"),
        ('backend = "batch"\nimage = "app:1"', "missing key 'job_queue', which a 'batch' target needs"),
        ('backend = "batch"\njob_queue = "q"', "a batch target needs image (a job definition is registered"),
        ('backend = "batch"\njob_queue = "q"\nimage = "app:1"\nstorage = "bucket/prefix"',
         "invalid storage = 'bucket/prefix': Expected `str` matching regex"),
        ('backend = "batch"\njob_queue = "q"\nimage = "app:1"\nmax_array_size = 20000',
         "invalid max_array_size = 20000: Expected `int` <= 10000"),
        ('backend = "batch"\njob_queue = "q"\nimage = "app:1"\npoll_interval = -1',
         "invalid poll_interval = -1: Expected `float` > 0"),
        ('backend = "batch"\njob_queue = "q"\njob_definition = "jd"\narray = 1',
         "invalid array = 1: Expected `bool`, got `int`"),
    ],
)
def test_a_bad_target_table_names_the_file_the_table_and_the_key(tmp_path: Path, table: str, message: str) -> None:
    path = _pyproject(tmp_path, f"[tool.shoal.offload.gpu]\n{table}")
    with pytest.raises(engine.ConfigError) as caught:
        engine.Engine(store="memory")
    text = str(caught.value)
    assert text.startswith(f"config file {path}: [tool.shoal.offload.gpu]"), text
    assert message in text


@pytest.mark.parametrize("form", ["pyproject", "shoal.toml"])
def test_no_target_may_be_named_local(tmp_path: Path, form: str) -> None:
    if form == "pyproject":
        path, header = _pyproject(tmp_path, '[tool.shoal.offload.local]\nbackend = "local"'), "[tool.shoal.offload.local]"
    else:
        path, header = tmp_path / "shoal.toml", "[offload.local]"
        path.write_text('[offload.local]\nbackend = "local"\n')
    with pytest.raises(engine.ConfigError) as caught:
        load_config()
    assert str(caught.value).startswith(f"config file {path}: {header}: no target may be named 'local'")
    assert 'means "run in this process"' in str(caught.value)


def test_a_target_that_is_not_a_table_names_it(tmp_path: Path) -> None:
    path = _pyproject(tmp_path, '[tool.shoal.offload]\ngpu = "ssh"')
    with pytest.raises(engine.ConfigError) as caught:
        load_config()
    assert str(caught.value).startswith(f"config file {path}: invalid shoal setting offload[...]: ")
    assert "([tool.shoal.offload.gpu] = 'ssh' must be a table with a backend key and its options)" in str(
        caught.value
    )


def test_the_local_target_defaults_to_this_interpreter() -> None:
    # "" stands for sys.executable, so a table that sets nothing passes nothing.
    assert LocalTarget().python == "" and "python" not in LocalTarget().options()
    assert LocalTarget(python=sys.executable).options() == {"python": sys.executable}
    assert re.fullmatch(r"\[offload\.gpu\]", engine.Config().target_table("gpu"))


def test_a_config_made_in_code_cannot_name_a_target_local_either() -> None:
    with pytest.raises(engine.ConfigError, match="Config offload=: no target may be named 'local'"):
        engine.Config(offload={"local": LocalTarget()})
    assert engine.Config(offload={"box": LocalTarget()}).offload == {"box": LocalTarget()}

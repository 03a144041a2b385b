"""What ``make services`` sets on the machine for the broker: the kernel's writeback
(deploy/sysctl/60-mailroute-writeback.conf) and RabbitMQ's quorum-queue WAL size
(deploy/rabbitmq/60-mailroute.conf).  That each key is real, that both were applied on this
machine, that debian-setup.sh warns and goes on where the kernel's cannot be applied, and what
the pipeline benchmark reads of them.  (Why: README "Performance".)"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from bench.common import kernel_writeback, rabbitmq_wal_max_bytes, writeback_is_bursty

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
CONF = DEPLOY / "sysctl" / "60-mailroute-writeback.conf"
RABBITMQ_CONF = DEPLOY / "rabbitmq" / "60-mailroute.conf"
SETUP = DEPLOY / "debian-setup.sh"


def settings_of(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, value = (part.strip() for part in line.split("=", 1))
            pairs[key] = value
    return pairs


def proc_path(key: str) -> Path:
    return Path("/proc/sys") / key.replace(".", "/")


def run_setup_writeback(conf: Path, target: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", f'source "{SETUP}"; setup_writeback'],
        env={**os.environ, "WRITEBACK_CONF": str(conf), "WRITEBACK_TARGET": str(target)},
        capture_output=True, text=True, timeout=60, check=False)


def test_every_setting_is_a_kernel_setting_with_a_whole_number() -> None:
    settings = settings_of(CONF)
    assert set(settings) == {"vm.dirty_background_bytes", "vm.dirty_expire_centisecs",
                             "vm.dirty_writeback_centisecs"}
    for key, value in settings.items():
        assert proc_path(key).exists(), key
        assert value.isdigit(), (key, value)


def test_make_services_applied_the_settings_on_this_machine() -> None:
    if not os.access(proc_path("vm.dirty_expire_centisecs"), os.W_OK):
        pytest.skip("/proc/sys/vm is read-only here (a container): debian-setup.sh warns")
    for key, value in settings_of(CONF).items():
        assert proc_path(key).read_text().strip() == value, key
    assert not writeback_is_bursty(kernel_writeback())


def test_the_broker_runs_with_the_wal_size_make_services_set() -> None:
    settings = settings_of(RABBITMQ_CONF)
    assert set(settings) == {"raft.wal_max_size_bytes"}
    want = int(settings["raft.wal_max_size_bytes"])
    running = rabbitmq_wal_max_bytes()
    if running is None:
        pytest.skip("RabbitMQ on 127.0.0.1:5672 is not this machine's node (no rabbitmqctl)")
    assert running == want
    installed = Path("/etc/rabbitmq/conf.d/60-mailroute.conf")
    assert installed.read_bytes() == RABBITMQ_CONF.read_bytes()


def test_the_compose_broker_gets_the_same_settings() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    volumes = compose["services"]["rabbitmq"]["volumes"]
    assert "./rabbitmq/60-mailroute.conf:/etc/rabbitmq/conf.d/60-mailroute.conf:ro" in volumes


def test_setup_is_quiet_when_the_settings_are_already_there(tmp_path: Path) -> None:
    # A file holding the machine's present values: applying it changes nothing.
    current = tmp_path / "current.conf"
    current.write_text("".join(f"{key} = {proc_path(key).read_text().strip()}\n"
                               for key in settings_of(CONF)))
    target = tmp_path / "installed.conf"
    target.write_bytes(current.read_bytes())
    result = run_setup_writeback(current, target)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_setup_warns_and_goes_on_where_a_setting_cannot_be_applied(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.conf"
    bogus.write_text("# no such kernel setting\nvm.mailroute_no_such_knob = 1\n")
    result = run_setup_writeback(bogus, tmp_path / "installed.conf")
    assert result.returncode == 0, result.stderr
    assert "WARNING: could not apply" in result.stdout
    assert "vm.mailroute_no_such_knob" in result.stdout
    assert "stall every 30 s" in result.stdout


@pytest.mark.parametrize(("values", "bursty"), [
    # the kernel's defaults: flushed by age only, after 30 s
    ({"dirty_background_bytes": 0, "dirty_background_ratio": 10,
      "dirty_expire_centisecs": 3000, "dirty_writeback_centisecs": 500}, True),
    # deploy/sysctl/60-mailroute-writeback.conf
    ({"dirty_background_bytes": 16777216, "dirty_background_ratio": 0,
      "dirty_expire_centisecs": 300, "dirty_writeback_centisecs": 100}, False),
    # a byte threshold alone already keeps the bursts small
    ({"dirty_background_bytes": 16777216, "dirty_background_ratio": 0,
      "dirty_expire_centisecs": 3000, "dirty_writeback_centisecs": 500}, False),
    # unreadable (not Linux): not called bursty on no evidence
    ({"dirty_background_bytes": None, "dirty_background_ratio": None,
      "dirty_expire_centisecs": None, "dirty_writeback_centisecs": None}, False),
])
def test_the_benchmark_tells_the_bursty_default(values: dict[str, int | None],
                                                bursty: bool) -> None:
    assert writeback_is_bursty(values) is bursty

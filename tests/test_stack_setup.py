"""`switchyard up` set-up without starting processes: which ports a stack takes, and what happens to
its work directory when it stops (Stack.start is replaced by a stand-in that only writes a log)."""
from __future__ import annotations

import io
import tempfile
import threading
from dataclasses import replace

import pytest

from common import ports
from common.config import DEFAULT_ROUTER_PORT
from services.cli import build_parser, up_config
from services.launcher import Stack, StackError, run_up


def parse_up(*flags: str):
    return up_config(build_parser().parse_args(["up", *flags]))


# ---- ports -------------------------------------------------------------------------------------

def test_every_port_has_a_flag():
    cfg = parse_up("--port", "6001", "--nats-port", "6002", "--kv-index-port", "6003", "--worker-base-port", "6010",
                   "--pool-control-port", "6004", "--triton-port", "6005")
    assert (cfg.router_port, cfg.nats_port, cfg.kv_manager_port, cfg.worker_base_port, cfg.pool_control_port,
            cfg.triton_port) == (6001, 6002, 6003, 6010, 6004, 6005)


def test_flags_win_over_config_keys(tmp_path):
    conf = tmp_path / "stack.toml"
    conf.write_text("nats_port = 7002\nkv_manager_port = 7003\n")
    cfg = parse_up("--config", str(conf), "--nats-port", "6002")
    assert (cfg.nats_port, cfg.kv_manager_port) == (6002, 7003)


def test_unset_ports_are_free_ones_except_the_routers():
    cfg = parse_up()
    assert cfg.router_port == DEFAULT_ROUTER_PORT
    assert cfg.nats_port == cfg.kv_manager_port == cfg.worker_base_port == cfg.pool_control_port == 0
    resolved = Stack._resolve_ports(replace(cfg, router_port=0, triton_port=0))
    picked = [resolved.router_port, resolved.nats_port, resolved.kv_manager_port, resolved.triton_port]
    assert 0 not in picked and len(set(picked)) == len(picked)
    assert all(ports.is_free(p) for p in picked)


def test_free_port_never_hands_out_a_port_twice(monkeypatch):
    """A picked port is bound later by its child; the OS may offer it again before that."""
    offers = iter([41001, 41001, 41002, 41001, 41003])
    monkeypatch.setattr(ports, "_os_free_port", lambda host: next(offers))
    monkeypatch.setattr(ports, "_handed_out", set())
    assert [ports.free_port(), ports.free_port(), ports.free_port()] == [41001, 41002, 41003]


# ---- work directory ----------------------------------------------------------------------------

@pytest.fixture
def temp_root(tmp_path, monkeypatch):
    """The temp folder `switchyard up` makes its work directory in (and keeps state files in)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def started_stack(stack: Stack) -> Stack:
    """Stack.start without processes: just the log a child would have written."""
    stack.log_dir.mkdir(parents=True, exist_ok=True)
    (stack.log_dir / "router.log").write_text("router: serving\n")
    return stack


def failing_start(stack: Stack) -> Stack:
    started_stack(stack)
    raise StackError("worker-w0 exited with code 1 during start-up")


def up(workdir=None) -> int:
    stop = threading.Event()
    stop.set()   # as if Ctrl-C came right after start-up
    return run_up(parse_up("--port", "0"), workdir, out=io.StringIO(), stop=stop)


def workdirs(root):
    return sorted(root.glob("switchyard-*"))


def test_clean_stop_removes_the_temp_work_directory(temp_root, monkeypatch):
    monkeypatch.setattr(Stack, "start", started_stack)
    assert up() == 0
    assert workdirs(temp_root) == []


def test_failed_start_keeps_the_work_directory_and_says_where(temp_root, monkeypatch, capsys):
    monkeypatch.setattr(Stack, "start", failing_start)
    assert up() == 1
    [kept] = workdirs(temp_root)
    assert (kept / "logs" / "router.log").exists()
    assert f"logs kept in {kept / 'logs'}" in capsys.readouterr().err


def test_a_workdir_given_with_the_flag_is_kept(temp_root, tmp_path, monkeypatch):
    monkeypatch.setattr(Stack, "start", started_stack)
    mine = tmp_path / "mine"
    assert up(str(mine)) == 0
    assert (mine / "logs" / "router.log").exists()

"""`radixrt serve --help`: every flag has help text that states its default."""

from __future__ import annotations

import argparse

import pytest

from radixrt.cli import config_from_args, serve_parser
from radixrt.config import EngineConfig


def test_every_serve_flag_has_help_with_its_default() -> None:
    for action in serve_parser()._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and "default" in action.help, (
            f"{action.option_strings}: help must describe the flag and its default")


def test_defaults_parse_into_a_valid_config() -> None:
    cfg = config_from_args(serve_parser().parse_args([]))
    assert cfg.request_timeout_s is None and cfg.max_worker_restarts >= 0


def test_supervision_flags_reach_the_config() -> None:
    cfg = config_from_args(serve_parser().parse_args(
        ["--worker-hang-timeout", "7", "--max-worker-restarts", "2", "--request-timeout", "30"]))
    assert (cfg.worker_hang_timeout_s, cfg.max_worker_restarts, cfg.request_timeout_s) == (
        7.0, 2, 30.0)


def test_bad_supervision_values_are_rejected() -> None:
    with pytest.raises(ValueError, match="request_timeout_s"):
        config_from_args(serve_parser().parse_args(["--request-timeout", "0"]))


def test_remote_listen_needs_its_curve_keys() -> None:
    with pytest.raises(ValueError, match="curve-server-secret"):
        config_from_args(serve_parser().parse_args(["--remote-listen", "tcp://127.0.0.1:5600"]))
    with pytest.raises(ValueError, match="tcp://"):
        config_from_args(serve_parser().parse_args(
            ["--remote-listen", "ipc:///tmp/x", "--curve-server-secret", "s",
             "--curve-clients", "c"]))
    with pytest.raises(ValueError, match="need --remote-listen"):
        config_from_args(serve_parser().parse_args(["--curve-clients", "c"]))
    cfg = config_from_args(serve_parser().parse_args(
        ["--remote-listen", "tcp://0.0.0.0:5600", "--curve-server-secret", "s",
         "--curve-clients", "c", "--max-remote-workers", "3"]))
    assert (cfg.remote_listen, cfg.max_remote_workers) == ("tcp://0.0.0.0:5600", 3)


def test_multi_node_flags_reach_the_engine_config() -> None:
    cfg = config_from_args(serve_parser().parse_args(
        ["--tp", "4", "--nnodes", "2", "--dist-init-addr", "10.0.0.1:29500"]))
    ecfg = cfg.engine_config()
    assert (ecfg.tp_size, ecfg.nnodes, ecfg.dist_init_addr) == (4, 2, "10.0.0.1:29500")
    with pytest.raises(ValueError, match="--dp 1"):
        config_from_args(serve_parser().parse_args(
            ["--tp", "2", "--nnodes", "2", "--dist-init-addr", "h:1", "--dp", "2"]))


def test_cascade_decode_flag_reaches_the_engine_config(capsys) -> None:
    assert config_from_args(serve_parser().parse_args([])).engine_config().cascade_decode == "auto"
    for mode in ("auto", "on", "off"):
        cfg = config_from_args(serve_parser().parse_args(["--cascade-decode", mode]))
        assert cfg.cascade_decode == mode and cfg.engine_config().cascade_decode == mode
    with pytest.raises(SystemExit):
        serve_parser().parse_args(["--cascade-decode", "sometimes"])
    err = capsys.readouterr().err
    assert "--cascade-decode" in err and "invalid choice" in err
    # A mode the engine cannot run fails naming the field, not deep in a worker.
    cfg = config_from_args(serve_parser().parse_args(
        ["--cascade-decode", "on", "--enable-deterministic-inference", "--device", "cuda"]))
    with pytest.raises(ValueError, match="cascade_decode"):
        cfg.engine_config()


def test_keys_command_writes_private_key_files(tmp_path, capsys) -> None:
    import stat

    from radixrt.cli import main
    from radixrt.server import keys

    out = tmp_path / "k"
    assert main(["keys", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "--curve-server-secret" in printed and "--curve-client-secret" in printed
    for f in ("server.key_secret", "client.key_secret", "server.key", "clients/client.key"):
        assert stat.S_IMODE((out / f).stat().st_mode) == 0o600, f
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    client = keys.load_pair(str(out / "client.key_secret"))
    assert keys.load_allowed(str(out / "clients")) == {client.public}
    assert "secret" not in repr(client).replace("secret=<hidden>", "")
    assert main(["keys", "--out", str(out)]) == 1, "never overwrites keys"


def test_worker_and_node_commands_validate_their_flags(capsys) -> None:
    from radixrt.cli import main

    with pytest.raises(SystemExit):
        main(["worker", "--router", "ipc:///x", "--curve-client-secret", "a",
              "--curve-server-public", "b"])
    assert "tcp://HOST:PORT" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["node", "--node-rank", "0", "--tp", "2", "--nnodes", "2",
              "--dist-init-addr", "127.0.0.1:1"])
    assert "--node-rank must be in [1, nnodes-1]" in capsys.readouterr().err
    assert main(["bogus"]) == 2


def test_skip_warmup_flag_reaches_the_engine_config() -> None:
    default = config_from_args(serve_parser().parse_args([])).engine_config()
    assert default.warmup is None and not default.warmup_enabled, "CPU default: no warm-up"
    cfg = config_from_args(serve_parser().parse_args(["--device", "cuda", "--skip-warmup"]))
    assert cfg.engine_config().warmup is False and not cfg.engine_config().warmup_enabled
    on_gpu = config_from_args(serve_parser().parse_args(["--device", "cuda"])).engine_config()
    assert on_gpu.warmup_enabled, "CUDA default: warm up"


def test_prefill_attention_flag_reaches_the_engine_config() -> None:
    assert config_from_args(serve_parser().parse_args([])).engine_config().prefill_attention == "triton"
    cfg = config_from_args(serve_parser().parse_args(
        ["--prefill-attention", "flashinfer", "--device", "cuda"]))
    assert cfg.engine_config().prefill_attention == "flashinfer"
    # It serves the triton backend on CUDA only; anything else fails naming the field.
    for extra in (["--device", "cpu"], ["--device", "cuda", "--attention-backend", "flashinfer"],
                  ["--device", "cuda", "--enable-deterministic-inference"]):
        cfg = config_from_args(serve_parser().parse_args(["--prefill-attention", "flashinfer", *extra]))
        with pytest.raises(ValueError, match="prefill_attention"):
            cfg.engine_config()
    with pytest.raises(ValueError, match="prefill_attention"):
        EngineConfig(prefill_attention="fa3")  # type: ignore[arg-type]

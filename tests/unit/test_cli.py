"""`radixrt serve --help`: every flag has help text that states its default."""

from __future__ import annotations

import argparse

import pytest

from radixrt.cli import config_from_args, serve_parser


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

"""CLI errors: one clear line naming the flag or file, exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "twotower", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["evaluate", "--bundle", "/no/such/dir"], "--bundle: directory not found: /no/such/dir"),
        (["train", "--epochs", "zero", "--out", "x"], "--epochs: expected a positive integer"),
        (["train", "--epochs", "0", "--out", "x"], "--epochs: expected a positive integer"),
        (["index", "build", "--bundle", ".", "--type", "lsh"], "--type: invalid choice: 'lsh'"),
        (["publish", "/no/such/bundle", "--registry", "r"], "bundle: directory not found"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["train"], "the following arguments are required: --out"),
        (["refresh", "--registry", "r", "--redis-url", "redis://x", "--mode", "nightly"], "--mode: invalid choice"),
        (["refresh", "--registry", "r", "--redis-url", "redis://x", "--engine", "spark"], "--engine: invalid choice"),
        (["refresh", "--registry", "r", "--redis-url", "redis://x", "--schedule", "0 3 * *"], "--schedule"),
        (["refresh", "--registry", "r", "--redis-url", "redis://x", "--flags", "/no/flags.yaml"],
         "--flags: file not found"),
        (["refresh", "--registry", "r", "--redis-url", "redis://x", "--item-features", "/no/items.jsonl"],
         "--item-features: file not found"),
        (["index", "tune", "--bundle", ".", "--nlists", "4000,lots"], "--nlists: expected comma-separated integers"),
        (["index", "tune", "--bundle", ".", "--nlists", ","], "--nlists: no list count in ','"),
        (["distill", "--teacher", "t.json", "--out", "o", "--kl-over", "all"], "--kl-over: invalid choice: 'all'"),
        (["replay", "--train-until", "yesterday"], "--train-until: 'yesterday' is not an ISO date"),
        (["replay", "--train-until", "1998-01-01", "--arms", "never,weekly"], "--arms: unknown arm(s) weekly"),
    ],
)
def test_bad_flags_and_paths(args: list[str], needle: str) -> None:
    proc = run(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0]


def test_not_a_bundle_is_one_line(tmp_path: Path) -> None:
    proc = run("verify", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"twotower verify: error: {tmp_path}: not a bundle (no manifest.json)"


def test_corrupt_bundle_refused_at_publish(synth_bundle: Path, tmp_path: Path) -> None:
    (synth_bundle / "popularity.npy").write_bytes(b"x")
    proc = run("publish", str(synth_bundle), "--registry", str(tmp_path / "reg"))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "refusing to publish" in proc.stderr and "popularity.npy" in proc.stderr


def test_refresh_flags_take_their_defaults_from_refresh_config() -> None:
    """One source of truth: every unset refresh flag is None (RefreshConfig's default applies)
    and the help states RefreshConfig's value."""
    from offline.refresh.config import RefreshConfig
    from twotower.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["refresh", "--registry", "R", "--redis-url", "redis://h:1/0"])
    for flag in ("mode", "engine", "max_drop", "train_epochs", "holdout_hours", "grace_s", "keep_versions",
                 "max_events", "train_blend", "train_min_targets", "train_min_users", "store_retention_days"):
        assert getattr(args, flag) is None, flag
    sub = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices["refresh"]  # type: ignore[union-attr,index]
    text = " ".join(sub.format_help().split())
    assert f"(default: {RefreshConfig.max_events})" in text and f"(default: {RefreshConfig.keep_versions})" in text
    assert f"(default {RefreshConfig.holdout_s / 3600:g})" in text and f"(default: {RefreshConfig.mode})" in text
    assert "measurably (95%) lower" in text  # a description's % survives argparse's formatting
    args = parser.parse_args(["refresh", "--registry", "R", "--redis-url", "redis://h:1/0", "--epochs", "2"])
    assert args.train_epochs == 2


def test_serve_flags_are_derived_from_serve_config() -> None:
    """Each serve flag that sets a config field takes its type, choices, help and default from
    the field's declaration; unset flags are None (the config file's or default value stays)."""
    from online.cli import SERVE_FLAGS
    from online.config import ServeConfig, load_config
    from towers.cliargs import OneLineParser, add_config_flags, config_field, config_overrides

    assert config_field(ServeConfig, "batching.max_batch_size")[1:] == (64, "requests answered together "
                                                                             "(1 turns batching off)")
    p = OneLineParser(prog="serve")
    add_config_flags(p, ServeConfig, SERVE_FLAGS)
    assert config_overrides(p.parse_args([]), SERVE_FLAGS) == {}
    args = p.parse_args(["--max-batch-size", "8", "--transport", "sync", "--tls-cert", "c.pem"])
    overrides = config_overrides(args, SERVE_FLAGS)
    assert overrides == {"batching__max_batch_size": 8, "transport": "sync", "tls__cert": "c.pem"}
    cfg = load_config(None, **overrides)
    assert (cfg.batching.max_batch_size, cfg.transport, cfg.tls.cert) == (8, "sync", "c.pem")
    assert cfg.batching.max_wait_ms == ServeConfig().batching.max_wait_ms  # untouched: the default
    help_text = p.format_help()
    assert "(default: 2.0)" in help_text and "{aio,sync}" in help_text and "--shed-answer {degrade,refuse}" in help_text


@pytest.mark.parametrize(("args", "needle"), [
    (["--max-batch-size", "0"], "--max-batch-size: Input should be greater than or equal to 1"),
    (["--port", "70000"], "--port: Input should be less than or equal to 65535"),
    (["--workers", "two"], "--workers: invalid int value: 'two'"),
    (["--log-format", "xml"], "--log-format: invalid choice: 'xml'"),
])
def test_bad_serve_flags_name_the_flag(tmp_path: Path, args: list[str], needle: str) -> None:
    proc = run("serve", "--bundle", str(tmp_path), *args)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr

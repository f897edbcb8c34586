"""``ssmkit serve`` command-line errors: one clear line and a non-zero status, before anything listens."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ssmkit.cli import main

from .conftest import assert_cli_refuses


def test_serve_reports_bad_arguments(model_dir, tmp_path, capsys):
    assert main(["serve", "--checkpoint", str(tmp_path / "missing")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    empty = tmp_path / "token"
    empty.write_text("\n")
    assert main(["serve", "--checkpoint", str(model_dir), "--token-file", str(empty)]) == 1
    assert "is empty" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(model_dir), "--token-file", str(tmp_path / "nope")]) == 1
    assert "cannot read --token-file" in capsys.readouterr().err
    huge = tmp_path / "huge-token"
    huge.write_bytes(b"x" * (65 * 1024))  # over the 64 KiB a secret file may have: refused before reading
    assert main(["serve", "--checkpoint", str(model_dir), "--token-file", str(huge)]) == 1
    assert "larger than" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a usage error, from the option's range
        main(["serve", "--checkpoint", str(model_dir), "--max-batch", "0"])
    assert e.value.code == 2 and "--max-batch: must be an integer from 1" in capsys.readouterr().err
    for flag, value, needle in (("--header-timeout", "0", "header_timeout_s"), ("--body-timeout", "nan", "body_timeout_s"),
                                ("--max-idle-connections", "0", "max_idle_connections"),
                                ("--session-disk-mb", "0", "session_disk_bytes")):
        assert_cli_refuses(["serve", "--checkpoint", str(model_dir), flag, value], needle, capsys)
    assert main(["serve", "--checkpoint", str(model_dir), "--bogus"]) == 2


def test_the_cli_does_not_import_the_web_stack():
    code = ("import sys, ssmkit.cli; ssmkit.cli.build_parser(); "
            "loaded = [m for m in ('fastapi', 'uvicorn', 'starlette', 'sse_starlette') if m in sys.modules]; "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)

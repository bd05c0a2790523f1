"""Sizes on the command line and where the socket lives."""

from __future__ import annotations

import os
import tempfile

import pytest

from modelserver import config


@pytest.mark.parametrize(
    "text, expected",
    [
        ("512MiB", 512 << 20),
        ("8GiB", 8 << 30),
        ("1.5GB", 1_500_000_000),
        ("1024", 1024),
        ("2 kib", 2048),
        ("3k", 3000),
    ],
)
def test_parse_size(text, expected):
    assert config.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "5 parsecs", "-1GiB", "1..2MB"])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(ValueError, match="not a size"):
        config.parse_size(text)


def test_socket_path_resolution_order(monkeypatch, tmp_path):
    monkeypatch.setenv("BEAMLET_SOCKET", "/somewhere/s.sock")
    assert config.socket_path("/explicit.sock") == "/explicit.sock"
    assert config.socket_path() == "/somewhere/s.sock"
    monkeypatch.delenv("BEAMLET_SOCKET")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert config.socket_path() == str(tmp_path / "beamlet" / "modelserver.sock")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert config.socket_path() == os.path.join(
        tempfile.gettempdir(), f"beamlet-{os.getuid()}", "modelserver.sock"
    )


def test_private_dir_is_created_0700_and_foreign_ones_refused(tmp_path):
    d = tmp_path / "new"
    config.ensure_private_dir(str(d))
    assert (d.stat().st_mode & 0o777) == 0o700
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o775)
    with pytest.raises(PermissionError, match="open to other users"):
        config.ensure_private_dir(str(open_dir))
    if os.geteuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 65534, 65534)
        with pytest.raises(PermissionError, match="belongs to uid 65534"):
            config.ensure_private_dir(str(foreign))

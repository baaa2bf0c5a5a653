"""Config files: one-line errors naming the key and the fix; any error shown as its first line."""

from __future__ import annotations

from pathlib import Path

import pytest

from affectedge.errors import first_line
from affectedge.settings import ConfigError, Section, load


class Mqtt(Section):
    host: str = "127.0.0.1"
    port: int = 1883


class Example(Section):
    name: str = "agent"
    mqtt: Mqtt = Mqtt()


def test_defaults_without_file() -> None:
    assert load(None, Example).mqtt.port == 1883


def test_valid_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('name = "x"\n[mqtt]\nport = 8883\n')
    assert load(path, Example).mqtt.port == 8883


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[mqtt]\nport = "abc"\n', "key `mqtt.port`"),
        ("[mqtt]\nprot = 1\n", "unknown key `mqtt.prot`"),
        ("[mqtt\n", "not valid TOML"),
    ],
)
def test_errors_are_one_line_and_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(path, Example)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    assert str(path) in message


def test_missing_file_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load(tmp_path / "absent.toml", Example)


class Camera(Section):
    id: str
    source: str = "0"


class WithSecrets(Section):
    password: str | None = None
    admin_password: str = ""
    secret_key: str = ""
    api_tokens: tuple[str, ...] = ()
    cameras: tuple[Camera, ...] = ()
    port: int = 1883


@pytest.mark.parametrize("text", [
    "password = 31415926\n",  # wrong type: pydantic's input is the password itself
    "admin_password = 31415926\n",  # key names that hold a secret word count too
    "secret_key = 31415926\n",
    "api_tokens = [31415926]\n",
    '[[cameras]]\nid = "a"\nsource = ["rtsp://admin:S3cret@cam/s"]\n',
    '[[cameras]]\nid = 7\nsource = "rtsp://admin:S3cret@cam/s"\n',  # an error in the same camera
])
def test_errors_never_repeat_secret_values(tmp_path: Path, text: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(path, WithSecrets)
    assert "S3cret" not in str(info.value) and "31415926" not in str(info.value)


def test_plain_values_are_still_shown(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('port = "x"\n')
    with pytest.raises(ConfigError, match=r"key `port`.*\(got 'x'\)"):
        load(path, WithSecrets)


def test_unreadable_config_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        load(tmp_path, Example)  # a directory
    binary = tmp_path / "c.toml"
    binary.write_bytes(b"\xff\xfe\x00name")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load(binary, Example)


def test_duplicate_camera_ids_name_the_id_not_the_sources(tmp_path: Path) -> None:
    from edge_agent.config import AgentConfig

    path = tmp_path / "agent.toml"
    path.write_text('[[cameras]]\nid = "front"\nsource = "rtsp://admin:S3cret@cam1/s"\n'
                    '[[cameras]]\nid = "front"\nsource = "rtsp://admin:S3cret@cam2/s"\n')
    with pytest.raises(ConfigError) as info:
        load(path, AgentConfig)
    assert "camera id 'front' is used twice" in str(info.value) and "S3cret" not in str(info.value)


@pytest.mark.parametrize(("exc", "shown"), [
    (RuntimeError("no such table: observations\n[SQL: INSERT ...]\n(Background ...)"), "no such table: observations"),
    (RuntimeError("\n  leading blank line\nmore"), "leading blank line"),
    (RuntimeError(""), "RuntimeError"),  # an empty message: its type, not an IndexError
    (OSError(), "OSError"),
    (None, "NoneType"),
])
def test_first_line(exc: BaseException | None, shown: str) -> None:
    assert first_line(exc) == shown
    assert len(first_line(RuntimeError("x" * 500))) == 300 and len(first_line(RuntimeError("x" * 500), 200)) == 200

"""Config files: one-line errors naming the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

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

"""The coordinator's config file as ``coordinator serve --config`` loads it: [xapi] home_page."""

from __future__ import annotations

from pathlib import Path

import pytest

from affectedge.settings import ConfigError
from coordinator.config import load_config

LRS = 'endpoint = "https://lrs.example.org/xAPI/"\n'


def config_file(tmp_path: Path, xapi: str) -> Path:
    path = tmp_path / "coordinator.toml"
    path.write_text(f"[web]\nhost = \"0.0.0.0\"\nport = 8080\n[xapi]\n{xapi}")
    return path


def test_an_lrs_without_home_page_is_refused_at_load_saying_what_to_set_and_why(tmp_path):
    """Without it the statements' identifiers came from [web] host:port, which differ between instances and
    are the same at every school."""
    with pytest.raises(ConfigError) as info:
        load_config(config_file(tmp_path, LRS))
    message = str(info.value)
    assert "\n" not in message
    assert "key `xapi.home_page`" in message
    assert "public base URL, e.g. https://affectedge.school.example" in message
    assert "same across hosts, ports and failovers" in message


@pytest.mark.parametrize("home_page", [
    "affectedge.school.example",  # no scheme
    "ftp://affectedge.school.example",
    "https://",  # no host
    "https://affectedge.school.example/?school=1",
    "https://affectedge.school.example/#top",
    "https://admin:secret@affectedge.school.example",  # would be published in every statement
    "https://affectedge.school.example:http",  # not a port
    "https://affectedge.school.example/my school",  # no IRI holds a space
])
def test_a_home_page_that_cannot_root_stable_iris_is_a_one_line_error(tmp_path, home_page):
    with pytest.raises(ConfigError) as info:
        load_config(config_file(tmp_path, f'{LRS}home_page = "{home_page}"\n'))
    message = str(info.value)
    assert "\n" not in message
    assert "key `xapi.home_page`" in message
    assert "e.g. https://affectedge.school.example" in message


@pytest.mark.parametrize(("home_page", "stored"), [
    ("https://affectedge.school.example", "https://affectedge.school.example"),
    ("https://affectedge.school.example/", "https://affectedge.school.example"),  # one school, one set of IRIs
    ("http://school.example:8443/affectedge/", "http://school.example:8443/affectedge"),
])
def test_a_home_page_is_kept_without_its_trailing_slash(tmp_path, home_page, stored):
    config = load_config(config_file(tmp_path, f'{LRS}home_page = "{home_page}"\n'))
    assert config.xapi.home_page == stored


def test_without_an_lrs_home_page_may_stay_empty(tmp_path):
    assert load_config(config_file(tmp_path, "")).xapi.home_page == ""
    assert load_config(None).xapi.home_page == ""

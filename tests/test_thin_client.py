"""The thin ``vlmduo ask`` client's own logic (its server round trips: test_serve_cli.py)."""

from __future__ import annotations

import pytest
import typer.main

from vlmduo.cli import terminal, thin_client
from vlmduo.cli.app import app


def _ask_params():
    return typer.main.get_command(app).commands["ask"].params


def test_the_option_tables_are_the_ask_commands_options():
    options = [p for p in _ask_params() if p.param_type_name == "option"]
    flags = {name for p in options if p.is_flag for name in p.opts} | {"--help"}
    values = {name for p in options if not p.is_flag for name in p.opts}
    assert thin_client.FLAG_OPTIONS == flags
    assert thin_client.VALUE_OPTIONS == values
    assert all(p.nargs == 1 for p in options)  # one value each, as positionals() reads them


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["a.png", "What?"], ["a.png", "What?"]),
        (["--mode", "large", "a.png", "What?", "--json"], ["a.png", "What?"]),
        (["a.png", "--think-budget=24", "What?", "-q"], ["a.png", "What?"]),
        (["-", "What?"], ["-", "What?"]),
        (["a.png", "--temperature", "-1", "q"], ["a.png", "q"]),  # a value may start with -
        (["a.png"], ["a.png"]),  # too few: the caller declines, the usual path says why
        (["--small", "/abs/s.gguf", "a.png", "q"], ["a.png", "q"]),
        (["--small", "rel/s.gguf", "a.png", "q"], None),  # relative to our directory, not the server's
        (["--small=org/repo:file", "a.png", "q"], None),
        (["--no-server", "a.png", "q"], None),
        (["--each", "dir", "q"], None),
        (["--batch", "-"], None),
        (["--help"], None),
        (["--debug", "a.png", "q"], None),
        (["a.png", "q", "--bogus"], None),
        (["a.png", "q", "-qv"], None),  # a short-option cluster: click's to judge
        (["--", "a.png", "q"], None),
        (["a.png", "q", "--json=1"], None),
        (["a.png", "q", "--mode"], None),  # a missing value
    ],
)
def test_positionals_read_the_command_line_as_click_does(argv, expected):
    assert thin_client.positionals(argv) == expected


def test_meaning_env_keeps_what_changes_an_answer_and_never_credentials():
    environ = {
        "VLMDUO_PAIR": "synthetic",
        "VLMDUO_HOME": "/h",
        "HF_HUB_OFFLINE": "1",
        "HOME": "/root",
        "XDG_CACHE_HOME": "/c",
        "VLMDUO_API_KEY": "secret",
        "HF_TOKEN": "hf_secret",
        "VLMDUO_SERVER_WAIT": "10",
        "PATH": "/bin",
        "COLUMNS": "80",
    }
    assert thin_client.meaning_env(environ) == {
        "VLMDUO_PAIR": "synthetic",
        "VLMDUO_HOME": "/h",
        "HF_HUB_OFFLINE": "1",
        "HOME": "/root",
        "XDG_CACHE_HOME": "/c",
    }


@pytest.mark.parametrize(
    ("env", "size", "tty", "width"),
    [
        ({}, None, False, 80),
        ({}, (132, 40), True, 132),
        ({"COLUMNS": "60"}, (132, 40), True, 60),
        ({"TERM": "dumb", "COLUMNS": "60"}, (132, 40), True, 80),  # as rich: a dumb terminal is 80
        ({"TERM": "dumb", "COLUMNS": "60"}, None, False, 60),
    ],
)
def test_a_client_terminal_has_the_width_rich_would_find_there(env, size, tty, width):
    remote = terminal.Remote(stderr_tty=tty, size=size, env=env)
    with terminal.remote(remote):
        console = terminal.console(stderr=True)
    assert console.width == width
    assert console.is_terminal is tty and not console.is_interactive
    console.print("x")
    assert remote.stderr.getvalue().strip().endswith("x")


def test_without_a_client_terminal_output_is_this_process_s(capsys):
    assert terminal.current() is None
    terminal.console(stderr=True).print("on stderr")
    print("on stdout", file=terminal.stdout())
    out, err = capsys.readouterr()
    assert (out, err) == ("on stdout\n", "on stderr\n")


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8491"),
        ("0.0.0.0", "http://127.0.0.1:8491"),  # listening everywhere: reached on loopback
        ("::1", "http://[::1]:8491"),
        ("[::1]", "http://[::1]:8491"),
        ("::", "http://127.0.0.1:8491"),
    ],
)
def test_a_server_is_reached_where_its_url_says(host, url):
    from vlmduo.serve import address
    from vlmduo.serve.runtime import ServerRecord

    assert address.url(host, 8491) == url
    assert address.connect_to(host, 8491) == (url.removeprefix("http://").rsplit(":", 1)[0].strip("[]"), 8491)
    full = ServerRecord(
        key="k", pid=1, host=host.strip("[]"), port=8491, pair="p", refs={}, models={}, engine={}
    )
    assert full.url == url


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"HOME": "/h"}, "/h/.cache/vlmduo/run"),
        ({"HOME": "/h", "VLMDUO_CACHE": "/tmp/vc"}, "/tmp/vc/run"),
        ({"HOME": "/h", "XDG_CACHE_HOME": "/tmp/xdg"}, "/tmp/xdg/vlmduo/run"),
        ({"HOME": "/h", "VLMDUO_CACHE": "", "XDG_CACHE_HOME": "/x"}, "/x/vlmduo/run"),
    ],
)
def test_servers_are_found_in_the_run_directory_of_the_cache(monkeypatch, env, expected):
    from vlmduo import paths
    from vlmduo.serve import runtime

    for name in ("VLMDUO_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert paths.run_dir() == str(runtime.run_dir()) == expected

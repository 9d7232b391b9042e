"""``vlmduo serve``, ``ps``, ``stop`` and ``ask`` through a server, on the real engine.

A server runs the synthetic test pair in its own process (as a user's would) with
its own VLMDUO_CACHE; ``vlmduo ask`` runs as a subprocess against it and again with
``--no-server``, and the two must print the same thing (timings aside). Both use
one thread and the same image cap, so greedy decoding gives the same tokens.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import cli_env, interrupt_when, run_cli, with_endless_pair
from PIL import Image

from vlmduo.media.images import synthetic_image

ENGINE = ["--threads", "1", "--image-max-tokens", "256"]
CHOICE = "Which animal is it? A. cat B. dog C. bird D. fish"


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    env = cli_env(tmp_path_factory.mktemp("serve-env"))
    env["VLMDUO_SERVER_WAIT"] = "120"
    for name in ("VLMDUO_NO_SERVER", "VLMDUO_API_KEY"):
        env.pop(name, None)
    return env


@pytest.fixture(scope="module")
def models(small_files, large_files) -> list[str]:
    return [
        "--small", str(small_files.model), "--small-mmproj", str(small_files.mmproj),
        "--large", str(large_files.model), "--large-mmproj", str(large_files.mmproj),
    ]  # fmt: skip


def _records(env: dict[str, str]) -> list[dict]:
    run = Path(env["VLMDUO_CACHE"]) / "run"
    return [json.loads(p.read_text()) for p in run.glob("*.json")] if run.is_dir() else []


def _stop_all(env: dict[str, str]) -> None:
    run_cli(["stop", "--timeout", "20"], env, timeout=60)
    for record in _records(env):  # a server stop could not end: never leave one behind
        try:
            os.kill(record["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def server(env, models):
    """A detached server for the test pair, stopped after the module."""
    out = run_cli(
        ["serve", *models, *ENGINE, "--port", "0", "--keep-alive", "-1", "--detach"], env, timeout=180
    )
    try:
        assert out.returncode == 0, out.stderr.decode()
        url = out.stdout.decode().strip()
        assert url.startswith("http://127.0.0.1:")
        yield url
    finally:
        _stop_all(env)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for i, (w, h) in enumerate([(96, 72), (64, 64)]):
        img = synthetic_image(w, h, seed=i)
        Image.frombytes("RGB", (w, h), img.rgb).save(folder / f"photo{i}.png")
    (folder / "notes.png").write_text("not an image")
    return folder


def _without_timings(value):
    """What an answer says, less what its speed depends on: timings, and the tokens a
    cache held and the stages it spared (the threads of an encode that did not run: the
    server's image prefixes are not this process's), and how libgomp waited (the load)."""
    if isinstance(value, dict):
        skip = ("timings_ms", "cached", "threads", "waits")
        return {k: _without_timings(v) for k, v in value.items() if k not in skip}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _ask(args, env, stdin=None):
    return run_cli(["ask", *args, *ENGINE, "--think-budget", "24"], env, stdin=stdin, timeout=180)


@pytest.mark.parametrize("mode", ["duo", "large", "small"])
def test_ask_through_the_server_prints_what_in_process_prints(server, env, models, photos, mode):
    args = [str(photos / "photo0.png"), CHOICE, *models, "--mode", mode]
    served, local = _ask(args, env), _ask([*args, "--no-server"], env)
    assert served.returncode == local.returncode == 0, served.stderr.decode() + local.stderr.decode()
    assert served.stdout == local.stdout and served.stdout.strip()
    assert f"answered by vlmduo serve at {server}" in served.stderr.decode()
    assert "answered by" not in local.stderr.decode()
    load_row = next(line for line in served.stderr.decode().splitlines() if line.startswith("load"))
    assert set(load_row.split()[1:]) == {"0.0", "ms"}
    served_json = json.loads(_ask([*args, "--json"], env).stdout)
    local_json = json.loads(_ask([*args, "--json", "--no-server"], env).stdout)
    assert _without_timings(served_json) == _without_timings(local_json)
    assert served_json["timings_ms"].keys() == local_json["timings_ms"].keys()


def test_an_image_on_stdin_goes_to_the_server(server, env, models, photos):
    data = (photos / "photo1.png").read_bytes()
    served = _ask(["-", "Is it red?", *models, "--json"], env, stdin=data)
    local = _ask(["-", "Is it red?", *models, "--json", "--no-server"], env, stdin=data)
    assert served.returncode == local.returncode == 0, served.stderr.decode()
    assert _without_timings(json.loads(served.stdout)) == _without_timings(json.loads(local.stdout))


@pytest.mark.parametrize(
    ("image", "question", "code"),
    [("missing.png", "Is it red?", 1), ("notes.png", "Is it red?", 1), ("photo0.png", "   ", 2)],
)
def test_errors_read_the_same_through_the_server(server, env, models, photos, image, question, code):
    args = [str(photos / image), question, *models]
    served, local = _ask(args, env), _ask([*args, "--no-server"], env)
    assert served.returncode == local.returncode == code
    assert served.stderr == local.stderr and served.stderr.startswith(b"Error: ")
    assert served.stdout == local.stdout == b""


def test_other_engine_settings_answer_in_process_and_say_why(server, env, models, photos):
    out = run_cli(
        ["ask", str(photos / "photo0.png"), "Is it red?", *models, "--threads", "1"], env, timeout=180
    )
    assert out.returncode == 0, out.stderr.decode()
    err = out.stderr.decode()
    assert "answered by" not in err and "other engine settings" in err and "image_max_tokens" in err


def test_each_answers_every_image_with_one_line_and_fails_with_1(server, env, models, photos):
    served = _ask(["--each", str(photos), CHOICE, *models], env)
    local = _ask(["--each", str(photos), CHOICE, *models, "--no-server"], env)
    assert served.returncode == local.returncode == 1  # notes.png is not an image
    lines = [json.loads(line) for line in served.stdout.decode().splitlines()]
    assert [Path(line["image"]).name for line in lines] == ["notes.png", "photo0.png", "photo1.png"]
    assert lines[0]["error"]["message"].startswith("not an image")
    assert all(line["answer"] for line in lines[1:])
    assert [_without_timings(json.loads(x)) for x in local.stdout.decode().splitlines()] == [
        _without_timings(line) for line in lines
    ]
    # Loaded once: only the first answered item of the in-process run reports a load.
    local_lines = [json.loads(x) for x in local.stdout.decode().splitlines()]
    loads = [line["large"]["timings_ms"]["load"] for line in local_lines if "error" not in line]
    assert loads[0] > 0 and loads[1:] == [0.0]
    assert all(line["large"]["timings_ms"]["load"] == 0.0 for line in lines[1:])


def test_batch_reads_json_lines_from_stdin(server, env, models, photos):
    lines = [
        {"image": str(photos / "photo0.png"), "question": "Is it red?", "id": 1},
        "not json",
        {"image": str(photos / "photo1.png")},  # the default question
        {"image": str(photos / "missing.png"), "question": "Is it red?"},
    ]
    stdin = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines).encode()
    out = _ask(["--batch", "-", "How many?", *models], env, stdin=stdin)
    assert out.returncode == 1
    got = [json.loads(line) for line in out.stdout.decode().splitlines()]
    assert len(got) == 4 and got[0]["id"] == 1 and got[0]["answer"]
    assert "line 2" in got[1]["error"]["message"]
    assert got[2]["question"] == "How many?" and got[2]["format"] == "number"
    assert got[3]["error"]["message"] == f"image not found: {photos / 'missing.png'}"


def test_the_openai_client_asks_the_real_server(server, photos):
    import base64

    openai = pytest.importorskip("openai")
    data = base64.b64encode((photos / "photo0.png").read_bytes()).decode()
    client = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=120)
    model = next(m.id for m in client.models.list() if m.id.endswith(":duo"))
    reply = client.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": CHOICE},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
                ],
            }
        ],
    )
    assert reply.choices[0].message.content in {"A", "B", "C", "D"}
    assert reply.vlmduo["large"]["tokens"]["image"] > 0  # the image reached the model
    stream = client.chat.completions.create(
        model=model.replace(":duo", ":large"),
        messages=[{"role": "user", "content": "Describe it."}],
        stream=True,
        max_tokens=8,
        response_format={"type": "free"},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    final = chunks[-1].vlmduo
    assert text == final["answer"] and final["large"]["tokens"]["generated"] >= 1


def test_a_second_server_for_the_pair_refuses_and_detach_is_idempotent(server, env, models):
    again = run_cli(["serve", *models, *ENGINE, "--port", "0"], env, timeout=120)
    assert again.returncode == 1 and b"running already" in again.stderr
    detached = run_cli(["serve", *models, *ENGINE, "--port", "0", "--detach"], env, timeout=120)
    assert detached.returncode == 0 and detached.stdout.decode().strip() == server


def test_serve_then_ask_at_once_ps_and_stop(tmp_path, env, models, photos, large_files):
    """`vlmduo serve &` then `vlmduo ask` right away: the ask waits for the server."""
    other = dict(env, VLMDUO_CACHE=str(tmp_path / "cache"))
    pair = ["--small", str(large_files.model), "--small-mmproj", str(large_files.mmproj), *models[4:]]
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlmduo", "serve", *pair, *ENGINE, "--port", "0"],
        env=other,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not _records(other):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
            time.sleep(0.05)
        out = _ask([str(photos / "photo0.png"), "Is it red?", *pair], other)
        assert out.returncode == 0 and b"answered by vlmduo serve" in out.stderr, out.stderr.decode()
        listed = json.loads(run_cli(["ps", "--json"], other, timeout=60).stdout)["servers"]
        assert [(s["pid"], s["state"]) for s in listed] == [(proc.pid, "loaded")]
        stopped = run_cli(["stop"], other, timeout=60)
        assert stopped.returncode == 0 and f"pid {proc.pid}".encode() in stopped.stderr
        assert proc.wait(timeout=30) == 0 and b"Stopped." in proc.stderr.read()
        assert _records(other) == []
        assert b"No vlmduo server" in run_cli(["ps"], other, timeout=60).stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_a_non_loopback_address_needs_an_api_key(env, models):
    out = run_cli(["serve", *models, "--host", "0.0.0.0", "--port", "0"], env, timeout=60)
    assert out.returncode == 2 and b"--api-key" in out.stderr
    assert _records(env) == [] or all(r["host"] == "127.0.0.1" for r in _records(env))


# -- the thin client: `vlmduo ask` answered by the server without loading the CLI ------------
# Runs the thin client alone: exit 100 when it declines (the usual path would then run).
THIN = (
    "import sys; from vlmduo.cli import thin_client; "
    "code = thin_client.ask(sys.argv[1:]); sys.exit(100 if code is None else code)"
)


def _thin(args, env, stdin=None):
    command = [sys.executable, "-c", THIN, *args, *ENGINE, "--think-budget", "24"]
    return subprocess.run(command, input=stdin, env=env, capture_output=True, timeout=180)


def _shape(stderr: bytes) -> list[list[str]]:
    """The timing table without its figures (words only), and the caption's first words."""
    rows = []
    for line in stderr.decode().splitlines():
        words = [w for w in line.split() if not any(c.isdigit() for c in w) and w != "ms"]
        rows.append(words[:6])
    return rows


@pytest.mark.parametrize("mode", ["duo", "large"])
def test_a_thin_client_prints_what_in_process_prints(server, env, models, photos, mode):
    # Without the image cache: the server's memory and this process's disk hold
    # different images (its table would then have a restore row the other lacks).
    args = [str(photos / "photo0.png"), CHOICE, *models, "--mode", mode, "--no-image-cache"]
    thin, local = _thin(args, env), _ask([*args, "--no-server"], env)
    assert thin.returncode == local.returncode == 0, thin.stderr.decode() + local.stderr.decode()
    assert thin.stdout == local.stdout and thin.stdout.strip()
    assert f"answered by vlmduo serve at {server}".encode() in thin.stderr
    assert _shape(thin.stderr)[:-1] == _shape(local.stderr)  # the same table, and who answered
    thin_json = json.loads(_thin([*args, "--json"], env).stdout)
    local_json = json.loads(_ask([*args, "--json", "--no-server"], env).stdout)
    assert _without_timings(thin_json) == _without_timings(local_json)
    assert thin_json["timings_ms"].keys() == local_json["timings_ms"].keys()
    assert thin_json["timings_ms"]["process"] > thin_json["timings_ms"]["total"]


def test_a_thin_client_renders_for_its_own_terminal(server, env, models, photos):
    args = [str(photos / "photo0.png"), CHOICE, *models]
    narrow = _thin(args, dict(env, COLUMNS="60"))
    table = narrow.stderr.decode().splitlines()[:-1]  # the caption is one line, wrapped by the terminal
    assert narrow.returncode == 0 and max(len(line) for line in table) <= 60 < len(_thin(args, env).stderr)
    coloured = {k: v for k, v in env.items() if k != "NO_COLOR"}
    coloured["FORCE_COLOR"] = "1"
    thin, local = _thin(args, coloured), _ask([*args, "--no-server"], coloured)
    assert b"\x1b[" in thin.stderr and b"\x1b[" in local.stderr
    plain = _thin(args, env)
    assert b"\x1b[" not in plain.stderr


@pytest.mark.parametrize(
    ("args", "extra_env"),
    [
        (["--pair", "synthetic"], {}),  # other models than the server's
        (["--ctx", "2048"], {}),  # other engine settings
        (["--no-server"], {}),
        ([], {"VLMDUO_PAIR": "synthetic"}),  # an environment that could change the command
        ([], {"VLMDUO_NO_SERVER": "1"}),
    ],
)
def test_a_thin_client_declines_what_the_server_cannot_answer_exactly(
    server, env, models, photos, args, extra_env
):
    model_args = [] if "--pair" in args else models
    out = _thin([str(photos / "photo0.png"), "Is it red?", *model_args, *args], dict(env, **extra_env))
    assert out.returncode == 100 and out.stdout == out.stderr == b"", out.stderr.decode()


def test_a_thin_client_errors_read_as_in_process(server, env, models, photos):
    args = [str(photos / "photo0.png"), "Is it red?", *models, "--policy", "always", "--mode", "large"]
    thin, local = _thin(args, env), _ask([*args, "--no-server"], env)
    assert thin.returncode == local.returncode == 2
    assert thin.stderr == local.stderr and thin.stderr.startswith(b"Error: ")
    notes = _thin([str(photos / "notes.png"), "Is it red?", *models], env)
    assert notes.returncode == 1 and notes.stderr.startswith(b"Error: ") and b"notes.png" in notes.stderr


def test_the_cli_endpoint_wants_the_token_from_the_record(server, env):
    import httpx

    body = {"argv": ["example", "Is it red?"], "terminal": {}}
    refused = httpx.post(server + "/api/cli/ask", json=body, timeout=30)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
    token = _records(env)[0]["cli_token"]
    for body in ({"argv": 3}, {"argv": [], "env": [1]}, {"argv": [], "terminal": {"size": ["a", 1]}}):
        bad = httpx.post(server + "/api/cli/ask", json=body, headers={"x-vlmduo-cli-token": token})
        assert bad.status_code == 400, body


def test_ctrl_c_ends_a_thin_client_with_130_and_the_server_serves_on(tmp_path, env, photos):
    # The endless pair never ends a thought (greedy): the server is at work when the
    # client is interrupted, whatever the machine's speed.
    own = with_endless_pair(
        dict(env, VLMDUO_CACHE=str(tmp_path / "cache"), VLMDUO_HOME=str(tmp_path / "home"))
    )
    engine = ["--pair", "endless", "--ctx", "24576", "--threads", "1", "--image-max-tokens", "256"]
    started = run_cli(["serve", *engine, "--port", "0", "--keep-alive", "-1", "--detach"], own, timeout=300)
    assert started.returncode == 0, started.stderr.decode()
    try:
        (record,) = _records(own)
        status = f"http://127.0.0.1:{record['port']}/api/status"
        args = [
            str(photos / "photo0.png"),
            "Is it red?",
            *engine,
            "--mode",
            "large-think",
            "--temperature",
            "0",
        ]
        command = [sys.executable, "-c", THIN, *args, "--mode", "large-think", "--think-budget", "20000"]
        # Interrupted once the server reports the ask in hand.
        code, err = interrupt_when(command, own, lambda: httpx.get(status, timeout=10).json()["busy"])
        assert code == 130 and b"Interrupted" in err and b"Traceback" not in err, err.decode()
        command = [sys.executable, "-c", THIN, *args, "--mode", "large", "--think-budget", "24"]
        after = subprocess.run(command, env=own, capture_output=True, timeout=120)
        assert after.returncode == 0 and b"answered by vlmduo serve" in after.stderr, after.stderr.decode()
    finally:
        _stop_all(own)


def test_a_thin_client_on_a_terminal_says_it_asks_the_server_then_erases_it(server, env, models, photos):
    import pty

    master, slave = pty.openpty()
    try:
        args = [str(photos / "photo0.png"), CHOICE, *models, *ENGINE, "--think-budget", "24"]
        out = subprocess.run(
            [sys.executable, "-c", THIN, *args], env=env, stdout=subprocess.PIPE, stderr=slave, timeout=180
        )
        os.close(slave)
        seen = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the terminal's other end is closed: all read
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
    assert out.returncode == 0 and out.stdout.strip()
    assert seen.startswith(f"Asking the server at {server}…".encode()) and b"\r\x1b[2K" in seen
    assert b"answered by vlmduo serve" in seen


def test_a_second_question_to_the_server_reuses_the_image(server, env, models, photos):
    image = str(photos / "photo1.png")
    first = json.loads(_ask([image, "Is it red?", *models, "--json", "--mode", "large"], env).stdout)
    second = json.loads(_ask([image, "How many circles?", *models, "--json", "--mode", "large"], env).stdout)
    assert second["large"]["tokens"]["cached"] > 0
    assert second["large"]["timings_ms"]["encode"] == 0
    assert second["large"]["tokens"]["image"] == first["large"]["tokens"]["image"]
    listed = json.loads(run_cli(["ps", "--json"], env).stdout)["servers"]
    [row] = [r for r in listed if r["url"] == server]
    assert row["image_cache"]["entries"] >= 1 and row["image_cache"]["hits"] >= 1
    # Two questions in one call: both through the server, one answer line each.
    both = _ask([image, "Is it red?", "How many circles?", *models, "--mode", "large"], env)
    assert both.returncode == 0 and len(both.stdout.decode().splitlines()) == 2
    assert both.stderr.decode().count("answered by vlmduo serve") == 2

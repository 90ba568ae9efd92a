"""``relaydiff edit`` end to end on the tiny preset, and its bad input (exit 2, one line, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from relaydiff.cli import main


def test_edit_json(tiny_family: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "rounds.txt"
    prompts.write_text("a red circle on the left\na red square on the left\n")
    code = main(["edit", "--family", str(tiny_family), "--prompts", str(prompts), "--out", str(tmp_path / "o"),
                 "--steps", "4", "--preview-steps", "2", "--json"])
    out, _ = capsys.readouterr()
    assert code == 0
    payload = json.loads(out)
    assert [r["reused"] for r in payload["rounds"]] == [False, True] and payload["final"]["source"] == "host"
    assert (tmp_path / "o" / "contact_sheet.png").is_file() and (tmp_path / "o" / "round_2.png").is_file()
    code = main(["edit", "--family", str(tiny_family), "--prompts", str(prompts), "--out", str(tmp_path / "p"),
                 "--steps", "4", "--preview-steps", "2", "--no-host", "--json"])
    out, _ = capsys.readouterr()
    assert code == 0 and json.loads(out)["final"]["source"] == "preview"


@pytest.mark.parametrize("text, extra, message", [
    ("a red circle on the left\n\na blue circle on the left\n", [], "round 2 is empty"),
    ("a red circle on the left\n", ["--refine-strength", "1.5"], "refine_strength: strength 1.5 is outside (0, 1]"),
    ("a red circle on the left\n", ["--reuse-strength", "auto", "--predictors", "none"], "needs strength predictors"),
    ("a red circle on the left\n", ["--no-host", "--host-url", "ws://127.0.0.1:9/"], "contradict each other"),
    ("a red circle on the left\n", ["--host-url", "http://127.0.0.1:9/", "--token", "t" * 20], "is not a ws:// or wss:// URL"),
])
def test_edit_bad_input(tiny_family: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                        extra: list[str], message: str) -> None:
    prompts = tmp_path / "rounds.txt"
    prompts.write_text(text)
    code = main(["edit", "--family", str(tiny_family), "--prompts", str(prompts), "--out", str(tmp_path / "o"), *extra])
    _, err = capsys.readouterr()
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def _serve(server):  # type: ignore[no-untyped-def]
    """Run ``server`` on its own event loop in a thread; (url, stop)."""
    import asyncio
    import threading

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    url: list[str] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        url.append(loop.run_until_complete(server.start()))
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(30)

    def stop() -> None:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)

    return url[0], stop


def test_edit_over_the_link(tiny_family: Path, tiny_pair, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    """`edit --host-url`: the final is refined by a `relaydiff host` on 127.0.0.1 (its image is the in-process
    refiner's); the same command against a port nobody serves keeps the preview and says why."""
    import socket

    import numpy as np
    from PIL import Image

    from relaydiff.host.controller import HostConfig, HostServer

    token = tmp_path / "token"
    token.write_text("cli-edit-token-0123456789\n")
    prompts = tmp_path / "rounds.txt"
    prompts.write_text("a red circle on the left\na red square on the left\n")
    common = ["edit", "--family", str(tiny_family), "--prompts", str(prompts), "--steps", "4", "--preview-steps", "2",
              "--refine-strength", "0.5", "--predictors", "none", "--json"]
    host, device = tiny_pair
    url, stop = _serve(HostServer(host, device, auth_token="cli-edit-token-0123456789", config=HostConfig()))
    try:
        code = main([*common, "--out", str(tmp_path / "link"), "--host-url", url, "--token-file", str(token)])
    finally:
        stop()
    out, _ = capsys.readouterr()
    assert code == 0
    payload = json.loads(out)
    assert payload["final"]["source"] == "host" and payload["final"]["host_calls"] == 2 * 2 and payload["host_url"] == url
    assert main([*common, "--out", str(tmp_path / "local")]) == 0  # the host model in this process
    capsys.readouterr()
    a, b = (np.asarray(Image.open(tmp_path / d / "final.png")) for d in ("link", "local"))
    assert np.array_equal(a, b)

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main([*common, "--out", str(tmp_path / "down"), "--host-url", f"ws://127.0.0.1:{port}/",
                 "--token-file", str(token), "--connect-timeout", "2"])
    out, _ = capsys.readouterr()
    payload = json.loads(out)
    assert code == 0 and payload["final"]["source"] == "preview" and "host unreachable" in payload["final"]["note"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "down" / "final.png")),
                          np.asarray(Image.open(tmp_path / "down" / "round_2.png")))

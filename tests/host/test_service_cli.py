"""`relaydiff host` and `relaydiff device` end to end on 127.0.0.1 (the CLI functions, as relaydiff.cli calls them)."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from relaydiff.core.relay import relay
from relaydiff.runtime.settings import GenerationSettings


CLI_TOKEN = "cli-token-0123456789"  # at least 16 characters


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on port {port} after {timeout} s")


def test_host_and_device_commands_relay_one_image(tiny_family, tiny_pair, service_main, tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    token_file = tmp_path / "token"
    token_file.write_text(CLI_TOKEN + "\n")
    monkeypatch.setenv("RELAYDIFF_TOKEN", CLI_TOKEN)  # the device's token: never on the command line
    host_argv = ["host", "--family", str(tiny_family), "--listen", f"127.0.0.1:{port}", "--token-file", str(token_file),
                 "--fraction", "0.5", "--steps", "4", "--duration", "8", "--json"]
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(service_main(host_argv)), daemon=True)
    thread.start()
    wait_for_port(port, timeout=60)
    out = tmp_path / "relayed.png"
    code = service_main(["device", "--connect", f"ws://127.0.0.1:{port}/", "--prompt", "a red circle",
                         "--family", str(tiny_family), "--steps", "4", "--out", str(out), "--json"])
    thread.join(timeout=30)
    assert code == 0 and codes == [0]
    device_json, host_json = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert (device_json["mode"], device_json["relay_step"], device_json["steps"]) == ("relay", 2, 4)
    assert host_json["requests"] == 1 and host_json["by_source"] == {"device": 1}
    assert host_json["stats"]["accepted"] == 1 and host_json["stats"]["busy"] == 0
    expected = relay(*tiny_pair, GenerationSettings(steps=4).request("a red circle", 2)).images[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), expected)


def test_device_command_falls_back_when_the_host_is_unreachable(tiny_family, service_main, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "alone.png"
    code = service_main(["device", "--connect", f"ws://127.0.0.1:{free_port()}/", "--prompt", "a blue square",
                         "--family", str(tiny_family), "--token", CLI_TOKEN, "--steps", "2", "--connect-timeout", "1",
                         "--out", str(out), "--json"])
    payload = json.loads(capsys.readouterr().out)
    assert code == 0 and payload["mode"] == "device-only" and "unreachable" in payload["fallback_reason"]
    assert Image.open(out).size == (16, 16)


def test_device_command_without_a_token_is_a_clear_error(tiny_family, service_main, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("RELAYDIFF_TOKEN", raising=False)
    code = service_main(["device", "--connect", "ws://127.0.0.1:1/", "--prompt", "x", "--family", str(tiny_family)])
    assert code == 2 and "no link token" in capsys.readouterr().out  # (see also test_token_sources_and_rules)


def test_host_command_learns_with_the_bandit_and_keeps_its_state(tiny_family, service_main, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    import asyncio
    import io

    from relaydiff.host.bandit import BanditPolicy
    from relaydiff.link.events import DeviceCapabilities, Feedback, GenerateRequest, Ping, RelayHandoff, Result, ResultKind
    from relaydiff.link.transport import connect

    port, state = free_port(), tmp_path / "bandit.jsonl"
    host_argv = ["host", "--family", str(tiny_family), "--listen", f"127.0.0.1:{port}", "--token", CLI_TOKEN,
                 "--policy", "bandit", "--bandit-state", str(state), "--steps", "4", "--duration", "6", "--json"]
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(service_main(host_argv)), daemon=True)
    thread.start()
    wait_for_port(port, timeout=60)

    async def device() -> None:
        caps = DeviceCapabilities(("torch",), "cli-bandit-device", "ab" * 32, 50.0)
        link = await connect(f"ws://127.0.0.1:{port}/", auth_token=CLI_TOKEN, capabilities=caps)
        await link.send(GenerateRequest("r1", "a red circle", 0.5, 30.0))
        while not isinstance(event := await link.recv(), RelayHandoff):
            if isinstance(event, Ping):
                await link.send(event.pong())
        png = io.BytesIO()
        Image.new("RGB", (4, 4)).save(png, format="PNG")
        await link.send(Result("r1", ResultKind.PNG, png.getvalue()))
        await link.send(Feedback("r1", latency_s=2.0, quality=0.75))
        await asyncio.sleep(0.3)
        await link.close()

    asyncio.run(asyncio.wait_for(device(), 30))
    thread.join(timeout=30)
    assert codes == [0]
    summary = json.loads(capsys.readouterr().out)
    assert summary["policy"] == "BanditPolicy" and summary["bandit_observations"] == 1
    (obs,) = BanditPolicy.load(state).history
    assert obs.context.device_steps_per_second == 50.0 and obs.context.steps == 4


def test_host_command_policy_options_are_checked(tiny_family, service_main, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    base = ["host", "--family", str(tiny_family), "--listen", "127.0.0.1:0", "--token", CLI_TOKEN]
    cases = [
        (["--policy", "fixed"], "--policy fixed needs --fraction"),
        (["--policy", "rule", "--fraction", "0.5"], "--fraction applies to --policy fixed, not --policy rule"),
        (["--policy", "rule", "--bandit-state", str(tmp_path / "b.jsonl")], "--bandit-state applies to --policy bandit"),
        (["--policy", "bandit", "--bandit-state", str(tmp_path / "missing-dir" / "x" / "b.jsonl"), "--fraction", "0.2"],
         "--fraction applies to --policy fixed"),
        (["--policy", "rule", "--cache-budgets", "1,0.5"], "--cache-budgets applies to --policy bandit"),
        (["--policy", "bandit", "--cache-budgets", "1,half"], "--cache-budgets must be comma-separated numbers"),
        (["--policy", "bandit", "--cache-budgets", "1,0"], "BanditConfig.budgets item is 0.0; expected a finite number in (0, 1]"),
    ]
    for extra, message in cases:
        assert service_main(base + extra) == 2
        assert message in capsys.readouterr().out
    (tmp_path / "junk.jsonl").write_text("not json\n")
    assert service_main(base + ["--policy", "bandit", "--bandit-state", str(tmp_path / "junk.jsonl")]) == 2
    assert "is not JSON" in capsys.readouterr().out
    (tmp_path / "dir.jsonl").mkdir()
    assert service_main(base + ["--policy", "bandit", "--bandit-state", str(tmp_path / "dir.jsonl")]) == 2
    assert "bandit state file not found" in capsys.readouterr().out


def self_signed_cert(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (cryptography), as PEM files (cert, key)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relaydiff test host")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "host.pem", tmp_path / "host.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_host_and_device_over_wss_with_a_self_signed_certificate(tiny_family, service_main, tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cert, key = self_signed_cert(tmp_path)
    monkeypatch.setenv("RELAYDIFF_TOKEN", CLI_TOKEN)
    port = free_port()
    host_argv = ["host", "--family", str(tiny_family), "--listen", f"127.0.0.1:{port}", "--tls-cert", str(cert),
                 "--tls-key", str(key), "--fraction", "0.5", "--steps", "4", "--duration", "10", "--json"]
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(service_main(host_argv)), daemon=True)
    thread.start()
    wait_for_port(port, timeout=60)
    device = ["device", "--connect", f"wss://127.0.0.1:{port}/", "--prompt", "a red circle", "--family", str(tiny_family),
              "--steps", "4", "--connect-timeout", "3", "--json"]
    trusted = service_main(device + ["--ca", str(cert), "--out", str(tmp_path / "tls.png")])
    trusted_json = json.loads(capsys.readouterr().out)
    untrusted = service_main(device + ["--out", str(tmp_path / "untrusted.png")])  # the system CAs do not know it
    untrusted_json = json.loads(capsys.readouterr().out)
    thread.join(timeout=30)
    assert codes == [0] and trusted == untrusted == 0
    assert trusted_json["mode"] == "relay" and trusted_json["relay_step"] == 2
    assert untrusted_json["mode"] == "device-only" and "CERTIFICATE_VERIFY_FAILED" in untrusted_json["fallback_reason"]
    host_json = json.loads(capsys.readouterr().out)
    assert host_json["by_source"] == {"device": 1}


def test_token_sources_and_rules(tiny_family, service_main, tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("RELAYDIFF_TOKEN", raising=False)
    device = ["device", "--connect", "ws://127.0.0.1:1/", "--prompt", "x", "--family", str(tiny_family)]
    short = tmp_path / "short"
    short.write_text("abc\n")
    cases = [
        (["--token-file", str(short)], "the link token from --token-file"),
        (["--token", "tiny"], "the link token from --token is 4 characters; at least 16 are required"),
        (["--token-file", str(tmp_path / "missing")], "cannot be read"),
        (["--token-file", str(short), "--token", CLI_TOKEN], "--token-file or --token, not both"),
        ([], "no link token: pass --token-file FILE or set $RELAYDIFF_TOKEN"),
        (["--token", CLI_TOKEN, "--ca", str(short)], "--ca applies to a wss:// host"),
    ]
    for extra, message in cases:
        assert service_main(device + extra) == 2
        output = capsys.readouterr().out
        assert message in output and "abc" not in output.replace("abc\n", "")
    monkeypatch.setenv("RELAYDIFF_TOKEN", "short-env")
    assert service_main(device) == 2
    assert "the link token from $RELAYDIFF_TOKEN is 9 characters" in capsys.readouterr().out
    host = ["host", "--family", str(tiny_family), "--listen", "127.0.0.1:0", "--token", CLI_TOKEN]
    assert service_main(host + ["--tls-cert", str(short)]) == 2
    assert "--tls-cert and --tls-key go together" in capsys.readouterr().out
    assert service_main(host + ["--tls-cert", str(short), "--tls-key", str(short)]) == 2
    assert "cannot be loaded" in capsys.readouterr().out
    assert service_main(host + ["--max-queue", "0"]) == 2
    assert "HostConfig.max_queue must be a positive integer, got 0" in capsys.readouterr().out


def test_host_command_client_tokens_are_checked(tiny_family, service_main, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    base = ["host", "--family", str(tiny_family), "--listen", "127.0.0.1:0", "--token", CLI_TOKEN]
    secret = "a-client-token-0123456789"
    cases = [
        ("alice\n", "line 1: expected 'NAME TOKEN' (1 fields)"),
        (f"# comment\n\nalice {secret}\nalice {secret}x\n", "line 4: client 'alice' is named twice"),
        ("alice short\n", "line 1: the token of 'alice' is 5 characters; at least 16 are required"),
        (f"default {secret}\n", "client name 'default' must be"),
        (f"alice {CLI_TOKEN}\n", "also another client's (or the host's own) token"),
    ]
    for i, (text, message) in enumerate(cases):
        path = tmp_path / f"clients{i}.txt"
        path.write_text(text)
        assert service_main(base + ["--client-tokens", str(path)]) == 2
        out = capsys.readouterr().out
        assert message in out and secret not in out and len(out.strip().splitlines()) == 1
    assert service_main(base + ["--client-tokens", str(tmp_path / "missing.txt")]) == 2
    assert "cannot be read" in capsys.readouterr().out
    assert service_main(base + ["--max-per-client", "0"]) == 2
    assert "max_requests_per_client must be a positive integer or None, got 0" in capsys.readouterr().out

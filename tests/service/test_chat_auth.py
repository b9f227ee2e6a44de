"""`memsvc chat` against a server with auth on, and over TLS (issue 25, acceptance 3)."""
from __future__ import annotations

from click.testing import CliRunner

from memsvc.auth import KeyRing, hash_key
from memsvc.cli import main
from tests.service.servers import client, self_signed_cert, served

KEY = "carol-key-0123456789abcdef"


def _ring() -> KeyRing:
    return KeyRing.parse(f"carol={hash_key(KEY)}\n", source="test", allow_plain=False)


def test_chat_sends_its_api_key(tmp_path, tiny_model):
    runner = CliRunner()
    with served(tmp_path / "data", tiny_model, api_keys=_ring()) as (server, port):
        assert server.auth
        addr = f"127.0.0.1:{port}"
        out = runner.invoke(main, ["chat", "talk", "--address", addr, "--api-key", KEY, "--max-new-tokens", "3"],
                            input="Hello!\n")
        assert out.exit_code == 0, out.output
        assert "new session talk" in out.output and out.output.count("model> ") == 1
        env = runner.invoke(main, ["chat", "talk", "--address", addr], input="", env={"MEMSVC_API_KEY": KEY})
        assert env.exit_code == 0 and "resumed talk" in env.output and "2 messages" in env.output
        none = runner.invoke(main, ["chat", "talk", "--address", addr], input="", env={"MEMSVC_API_KEY": ""})
        assert none.exit_code != 0
        assert "UNAUTHENTICATED: this server needs an API key" in none.output and "--api-key" in none.output
        wrong = runner.invoke(main, ["chat", "talk", "--address", addr, "--api-key", KEY + "x"], input="")
        assert wrong.exit_code != 0 and "the API key is not valid" in wrong.output
        with client(port, api_key=KEY) as c:
            assert c.get_session("talk").messages == 2  # the turn is the tenant's session
        assert server.store.get("carol:talk").messages[0]["content"] == "Hello!"


def test_chat_over_tls(tmp_path, tiny_model):
    cert, key = self_signed_cert(tmp_path)
    runner = CliRunner()
    with served(tmp_path / "data", tiny_model, api_keys=_ring(), tls_cert=cert, tls_key=key) as (_, port):
        addr = f"127.0.0.1:{port}"
        out = runner.invoke(main, ["chat", "t", "--address", addr, "--api-key", KEY, "--tls-ca", str(cert),
                                   "--max-new-tokens", "2"], input="Hi\n")
        assert out.exit_code == 0, out.output
        assert "new session t" in out.output and "model> " in out.output

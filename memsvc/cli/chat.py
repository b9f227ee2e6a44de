"""`memsvc chat SESSION`: a multi-turn chat through the Python client, streaming each reply."""
from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command()
@click.argument("session")
@click.option("--address", default="127.0.0.1:50051", show_default=True)
@click.option("--max-new-tokens", default=256, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float)
@click.option("--system", default=None, help="A system message for a new session.")
@click.option("--api-key", default=None, envvar="MEMSVC_API_KEY", show_envvar=True,
              help="The API key of a server with auth on (sent as 'authorization: Bearer KEY').")
@click.option("--tls", is_flag=True, help="Connect over TLS, trusting the system's root certificates.")
@click.option("--tls-ca", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Connect over TLS, trusting this PEM certificate (a private CA, or the server's self-signed "
                   "--tls-cert).")
def chat(session: str, address: str, max_new_tokens: int, temperature: float, system: str | None,
         api_key: str | None, tls: bool, tls_ca: str | None) -> None:
    """Chat in SESSION (created if missing), streaming each reply. Ctrl-D ends."""
    import grpc

    from memsvc.clients.client import MemoryClient

    roots = Path(tls_ca).read_bytes() if tls_ca else None
    with MemoryClient(address, api_key=api_key or None, tls=tls, root_certificates=roots) as client:
        try:
            s = client.resume(session)
            click.echo(f"[resumed {s.id}: {s.tokens} tokens, {s.messages} messages]", err=True)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise _failed(exc)
            s = client.create_session(session)
            click.echo(f"[new session {s.id}]", err=True)
            if system:
                client.append(s.id, messages=[{"role": "system", "content": system}])
        while True:
            try:
                line = input("you> ")
            except EOFError:
                click.echo("", err=True)
                return
            if not line.strip():
                continue
            try:
                client.append(session, messages=[{"role": "user", "content": line}])
                click.echo("model> ", nl=False)
                for chunk in client.generate(session, max_new_tokens=max_new_tokens, temperature=temperature,
                                             commit=True):
                    click.echo(chunk.text, nl=False)
                    sys.stdout.flush()
                click.echo("")
            except grpc.RpcError as exc:
                raise _failed(exc)


def _failed(exc) -> click.ClickException:
    import grpc

    hint = ""
    if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
        hint = " (pass --api-key KEY or set MEMSVC_API_KEY)"
    elif exc.code() == grpc.StatusCode.UNAVAILABLE:
        hint = " (is the server up at --address? one serving TLS needs --tls or --tls-ca PEM)"
    return click.ClickException(f"{exc.code().name}: {exc.details()}{hint}")

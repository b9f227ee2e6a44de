"""`memsvc chat SESSION`: a multi-turn chat through the Python client, streaming each reply."""
from __future__ import annotations

import sys

import click


@click.command()
@click.argument("session")
@click.option("--address", default="127.0.0.1:50051", show_default=True)
@click.option("--max-new-tokens", default=256, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float)
@click.option("--system", default=None, help="A system message for a new session.")
def chat(session: str, address: str, max_new_tokens: int, temperature: float, system: str | None) -> None:
    """Chat in SESSION (created if missing), streaming each reply. Ctrl-D ends."""
    import grpc

    from memsvc.clients.client import MemoryClient

    with MemoryClient(address) as client:
        try:
            s = client.resume(session)
            click.echo(f"[resumed {s.id}: {s.tokens} tokens, {s.messages} messages]", err=True)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise click.ClickException(f"{exc.code().name}: {exc.details()}")
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
                raise click.ClickException(f"{exc.code().name}: {exc.details()}")

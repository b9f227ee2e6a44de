"""The `memsvc` command line: serve, keys new, model pull, chat, sessions ls|show|stats|rm|gc|verify|export|
import|upgrade, eval.

`sessions` reads the store directly (ls, show, stats, export and verify open it read-only), so an operator can
inspect a store with or without a server running; the commands that write to it (rm, gc, import, upgrade,
verify --repair) need the data dir to themselves and are refused while a server holds it
(memsvc.store.lmdb.dirlock). Nothing imports this package but the `memsvc` entry point.
"""
from __future__ import annotations

import logging

import click

from . import archive, chat, serve, sessions, verify


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("memsvc")
    except PackageNotFoundError:
        return "unknown (not installed: run `make venv`)"


@click.group()
@click.version_option(_version(), "--version", prog_name="memsvc", message="%(prog)s %(version)s")
@click.option("-v", "--verbose", is_flag=True, help="Log at debug level.")
def main(verbose: bool) -> None:
    """memsvc: long-term KV-cache memory for LLM agents and chatbots."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


for command in (serve.serve, serve.keys, serve.model, chat.chat):
    main.add_command(command)


@main.group("sessions")
def sessions_group() -> None:
    """Inspect stored sessions straight from the store (--store: an LMDB data directory or a PostgreSQL URL)."""


for command in (sessions.sessions_ls, sessions.sessions_show, sessions.sessions_stats, sessions.sessions_rm,
                sessions.sessions_gc, verify.sessions_verify, archive.sessions_upgrade, archive.sessions_export,
                archive.sessions_import):
    sessions_group.add_command(command)


def _eval_group():
    from memsvc.eval.cli import eval_cmd
    return eval_cmd


main.add_command(_eval_group(), "eval")

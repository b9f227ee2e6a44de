"""What both clients send and collect: request messages built from keyword arguments, the call metadata (API
key), channel credentials and options, and a Generate's chunks gathered into one result. Knows the generated
stubs and grpc only."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import grpc

from memsvc.proto import memsvc_pb2 as pb

# reconnect backoff at most 2 s (gRPC's default grows to 120 s): a replica back from a restart is reached soon
OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20),
           ("grpc.max_reconnect_backoff_ms", 2000)]


@dataclass
class GenerateResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    session: pb.Session | None = None


def append_request(session_id: str, messages, text, tokens) -> pb.AppendRequest:
    given = sum(x is not None for x in (messages, text, tokens))
    if given != 1:
        raise ValueError("append takes exactly one of messages=, text=, tokens=")
    req = pb.AppendRequest(session_id=session_id)
    if messages is not None:
        req.messages.SetInParent()
        for m in messages:
            role, content = (m["role"], m["content"]) if isinstance(m, Mapping) else m
            req.messages.messages.add(role=role, content=content)
    elif text is not None:
        req.text = text
    else:
        req.tokens.SetInParent()
        req.tokens.ids.extend(int(t) for t in tokens)
    return req


def generate_request(session_id: str, max_new_tokens: int, temperature: float, top_p: float,
                     stop: Sequence[str], seed: int, commit: bool, prefix: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(session_id=session_id, max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, stop=list(stop), seed=seed, commit=commit, prefix=prefix)


def create_request(session_id: str, policy: str, labels: Mapping[str, str] | None,
                   ttl_seconds: float) -> pb.CreateSessionRequest:
    return pb.CreateSessionRequest(session_id=session_id, policy=policy, labels=dict(labels or {}),
                                   ttl_seconds=ttl_seconds)


def fork_request(session_id: str, new_session_id: str, labels: Mapping[str, str] | None) -> pb.ForkSessionRequest:
    return pb.ForkSessionRequest(session_id=session_id, new_session_id=new_session_id, labels=dict(labels or {}))


def list_request(page_size: int, token: str, labels: Mapping[str, str] | None) -> pb.ListSessionsRequest:
    return pb.ListSessionsRequest(page_size=page_size, page_token=token, labels=dict(labels or {}))


def call_metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {api_key}"),) if api_key else None


def credentials(tls: bool, root_certificates: bytes | None):
    if root_certificates is not None or tls:
        return grpc.ssl_channel_credentials(root_certificates=root_certificates)
    return None


def collect(result: GenerateResult, chunk: pb.GenerateChunk) -> None:
    result.text += chunk.text
    result.token_ids.extend(chunk.token_ids)
    if chunk.finish_reason:
        result.finish_reason = chunk.finish_reason
    if chunk.HasField("session"):
        result.session = chunk.session

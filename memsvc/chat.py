"""Incremental chat rendering: turn N+1's tokens continue turn N's exactly.

A session keeps its chat messages. Appending new messages renders the whole
conversation with the model's chat template, checks that the previous
rendering is a prefix of the new one, and tokenizes only the new suffix. Chat
templates put a special token (e.g. `<|im_start|>`) at each turn boundary, so
the suffix tokenizes exactly as it would inside the full rendering; a template
for which that does not hold is refused rather than silently misaligned.

Knows the tokenizer's chat template; knows nothing about caches or storage.
"""
from __future__ import annotations

from dataclasses import dataclass


class TemplateError(ValueError):
    """Messages the chat template cannot render as a continuation."""


def _render(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> str:
    if not messages:
        return ""
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # jinja raises its own types for template-level refusals
        raise TemplateError(f"the model's chat template refused these messages: {exc}") from exc


def encode_text(tokenizer, text: str) -> list[int]:
    """Raw text -> token ids, no special tokens added (a BOS would split a session)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class ChatFormat:
    """What a model's template adds around an assistant reply."""

    has_template: bool
    end_of_turn: tuple[int, ...]  # ids that close an assistant turn, e.g. "<|im_end|>\n"

    @classmethod
    def of(cls, tokenizer) -> "ChatFormat":
        if not getattr(tokenizer, "chat_template", None):
            return cls(False, ())
        probe = [{"role": "user", "content": "x"}]
        prompt = _render(tokenizer, probe, add_generation_prompt=True)
        marker = "\u2063memsvc\u2063"
        full = _render(tokenizer, probe + [{"role": "assistant", "content": marker}], add_generation_prompt=False)
        at = full.find(marker)
        if not full.startswith(prompt) or at < 0:
            return cls(True, ())
        return cls(True, tuple(encode_text(tokenizer, full[at + len(marker):])))


BASE_ROLES = ("system", "user", "assistant")


def template_roles(tokenizer) -> tuple[str, ...]:
    """The roles a chat message may have: system, user and assistant, and tool when the model's chat template
    speaks of tools (templates that render tool results do)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # named templates
        template = " ".join(str(v) for v in template.values())
    return BASE_ROLES + (("tool",) if "tool" in str(template) else ())


def check_messages(tokenizer, new: list[dict]) -> None:
    """TemplateError unless every message has a role the template takes and some content."""
    roles = template_roles(tokenizer)
    for i, m in enumerate(new):
        role = m.get("role")
        if role not in roles:
            raise TemplateError(f"chat message {i} has role {role!r}; this model's chat template takes the roles "
                                f"{', '.join(repr(r) for r in roles)}")
        content = m.get("content")
        if not isinstance(content, str) or not content.strip():
            raise TemplateError(f"chat message {i} (role {role!r}) is empty: a message needs some content")


def continuation_ids(tokenizer, previous: list[dict], new: list[dict]) -> list[int]:
    """Token ids that render `new` after `previous` (the conversation so far)."""
    if not new:
        raise TemplateError("no messages to append")
    check_messages(tokenizer, new)
    before = _render(tokenizer, previous, add_generation_prompt=False)
    after = _render(tokenizer, previous + new, add_generation_prompt=False)
    if not after.startswith(before):
        raise TemplateError(
            "the chat template renders these messages differently from the conversation already stored "
            "(it is not prefix-stable); append raw text or token ids instead"
        )
    return encode_text(tokenizer, after[len(before):])


def generation_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Ids that open the assistant's turn after `messages` (empty when none is due)."""
    if not messages or messages[-1].get("role") == "assistant" or not getattr(tokenizer, "chat_template", None):
        return []
    before = _render(tokenizer, messages, add_generation_prompt=False)
    after = _render(tokenizer, messages, add_generation_prompt=True)
    if not after.startswith(before):
        return []
    return encode_text(tokenizer, after[len(before):])

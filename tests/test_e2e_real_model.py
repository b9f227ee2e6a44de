"""End to end on the real model (SmolLM2-135M-Instruct), in the default run.

A server process on port 0 with a temporary data dir takes a conversation of
more than 1,500 tokens of Paul Graham essays with a passkey in it and answers
greedily. Then the server is SIGKILLed, a new one starts on the same data dir,
resumes the session and answers again: the reply's tokens are identical, and
the model ran no history token again (GetStats counts every token the model
processes).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from memsvc.chat import generation_prompt_ids
from memsvc.clients.client import MemoryClient
from memsvc.corpus import passkey_prompt

PASSKEY = "71432"
ANSWER_PREFIX = "The pass key is"  # the classic passkey task prefixes the answer


class ServerProcess:
    def __init__(self, data_dir, *args: str):
        cmd = [sys.executable, "-m", "memsvc", "serve", "--port", "0", "--data-dir", str(data_dir), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        self.port: int | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()
        if not self._ready.wait(300) or self.port is None:
            self.proc.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.lines[-40:]))

    def _pump(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"serving .* on [\d.]+:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                self._ready.set()
        self._ready.set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


@pytest.fixture
def conversation(real_model):
    tok = real_model.tokenizer
    return [
        {"role": "user", "content": "I am going to give you a long text with something hidden in it."},
        {"role": "assistant", "content": "Sure, send it over. I will read it carefully."},
        {"role": "user", "content": passkey_prompt(tok, 1600, PASSKEY, 0.8) + "\n\nWhat is the pass key?"},
    ]


@pytest.mark.parametrize("policy", ["tiered", "full"])
def test_resume_after_sigkill_replays_identically_without_recompute(tmp_path, real_model, conversation, policy):
    data = tmp_path / "data"
    first = ServerProcess(data)
    try:
        with MemoryClient(first.address, timeout=600) as c:
            created = c.create_session("pk", policy=policy, labels={"test": "e2e"})
            assert created.policy == policy
            appended = c.append("pk", messages=conversation)
            n_history = appended.session.tokens
            assert n_history >= 1500
            assert c.stats().model_tokens_processed == n_history - 1  # the last token waits for the next call
            reference = c.generate_text("pk", max_new_tokens=8, prefix=ANSWER_PREFIX)
            assert reference.token_ids and reference.session.tokens == n_history
    finally:
        first.kill()
    print(f"\nreference reply ({n_history} history tokens): {reference.text!r}")
    # With the full cache this small model finds a late needle when the answer is prefixed.
    assert PASSKEY in reference.text

    second = ServerProcess(data)
    try:
        with MemoryClient(second.address, timeout=600) as c:
            assert c.get_session("pk").resident is False
            t0 = time.perf_counter()
            resumed = c.resume("pk")
            resume_s = time.perf_counter() - t0
            assert resumed.tokens == n_history and resumed.resident
            assert c.stats().model_tokens_processed == 0
            again = c.generate_text("pk", max_new_tokens=8, prefix=ANSWER_PREFIX)
            assert again.token_ids == reference.token_ids
            assert again.text == reference.text
            tok = real_model.tokenizer
            lead = generation_prompt_ids(tok, conversation) + tok(ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
            # pending last history token + generation prompt + prefix + every generated token but the last
            assert c.stats().model_tokens_processed == len(lead) + len(again.token_ids)
            # the conversation goes on after the resume
            c.generate_text("pk", max_new_tokens=12, commit=True)
            more = c.append("pk", messages=[{"role": "user", "content": "Thank you. Say it once more."}])
            assert more.session.tokens > n_history
            assert c.generate_text("pk", max_new_tokens=4).token_ids
        print(f"resume took {resume_s * 1000:.0f} ms")
        assert second.terminate() == 0  # SIGTERM: graceful stop
        assert any("stopped" in line for line in second.lines)
    finally:
        if second.proc.poll() is None:
            second.kill()

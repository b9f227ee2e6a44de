"""Model families through the service: the cache plugs into transformers through its Cache API and attention
interface, not into one model's code.

Tiny random models (2 layers, hidden 64, 4 query / 2 KV heads of 16, 2,048 positions) with the real tokenizer:
Llama; Qwen2 (q, k, v projections with bias); Mistral (a sliding window, wider than the context here);
Gemma-2 (soft-capped attention logits, a query scale of its own, alternating sliding and full layers, logits
capped at the end); Phi-3 (fused q/k/v and gate/up projections). For each family and policy (full, tiered):
Create, Append chat turns of essay text (~900 tokens: past sink + hot + warm, so tiered has cold blocks),
Generate with commit, Append, stop the server, Resume on a new server over the same data dir, Generate: the
same ids as a session that never restarted, with no history token run again. The full policy's reply is also
what transformers' own greedy generate gives for the session's ids (its own attention, not ours).
"""
from __future__ import annotations

import grpc
import pytest
import torch

from memsvc.chat import continuation_ids, generation_prompt_ids
from memsvc.corpus import essay_text
from tests.conftest import running_server

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
             pad_token_id=2, tie_word_embeddings=False,
             initializer_range=0.2)  # at the default 0.02 a random model answers one token over and over
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "mistral": ("MistralConfig", {"sliding_window": 4096}),
    # a cap of 5 (the real models' is 50) bends these small logits, so a path that skipped it would answer otherwise
    "gemma2": ("Gemma2Config", {"attn_logit_softcapping": 5.0, "query_pre_attn_scalar": 64}),
    "phi3": ("Phi3Config", {}),
}
POLICIES = ("full", "tiered")
REPLY = 8  # tokens each Generate asks for


def make_family_model(out, tokenizer_dir, family: str, *, seed: int = 0, **overrides):
    """A tiny random model of `family` with the real tokenizer and chat template, saved to `out`."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config_class, extra = FAMILIES[family]
    cfg = getattr(transformers, config_class)(vocab_size=len(tok), **SIZES, **(extra | overrides))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):  # biases start at zero: give Qwen2's q, k, v biases something to add
                p.normal_(0, 0.2)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def family_models(tmp_path_factory, real_model_dir):
    """family -> (model directory, loaded model), built once for this file."""
    from memsvc.model import load_model

    root = tmp_path_factory.mktemp("families")
    dirs = {f: make_family_model(root / f, real_model_dir, f) for f in FAMILIES}
    return {f: (d, load_model(str(d))) for f, d in dirs.items()}


def _turns() -> list[list[dict]]:
    """Four user turns of essay text, ~900 tokens with the template."""
    text = essay_text(3800)
    parts = [text[0:1100], text[1100:2200], text[2200:3300], text[3300:3800] + "\n\nWhat is this essay about?"]
    return [[{"role": "user", "content": p}] for p in parts]


def _converse(c, sid: str, policy: str) -> list[int]:
    """Create, Append three turns, Generate with commit, Append the fourth; returns the committed reply."""
    c.create_session(sid, policy=policy)
    turns = _turns()
    for turn in turns[:3]:
        c.append(sid, messages=turn)
    reply = c.generate_text(sid, max_new_tokens=REPLY, commit=True).token_ids
    c.append(sid, messages=turns[3])
    return list(reply)


def _tier_tokens(c, sid: str) -> dict[str, float]:
    return dict(c.get_session(sid).tier_tokens)


def hf_greedy(model_dir, ids: list[int], n: int) -> list[int]:
    """transformers' own greedy generate (its default attention and cache) after `ids`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=2)
    return out[0, len(ids):].tolist()


def _prompt(server, sid: str, tokenizer) -> list[int]:
    """What the model reads before a reply: the stored token ids, then the template's assistant opening."""
    store = server.store
    return store.tokens(sid) + generation_prompt_ids(tokenizer, store.get(sid).messages)


def _first_prompt_ids(tokenizer) -> list[int]:
    """The ids the first Generate reads: the first three turns and the assistant opening."""
    messages = [m for turn in _turns()[:3] for m in turn]
    return continuation_ids(tokenizer, [], messages) + generation_prompt_ids(tokenizer, messages)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_resumes_and_answers_as_a_session_that_never_stopped(tmp_path, family_models, family, policy):
    model_dir, loaded = family_models[family]
    data = tmp_path / "data"
    with running_server(data, loaded) as (c, _):
        first_reply = _converse(c, "s", policy)
        before = c.get_session("s")
        assert before.tokens > 850 and before.policy == policy
        if policy == "tiered":
            assert _tier_tokens(c, "s")["cold"] > 0  # past sink + hot + warm: cold blocks to store and read back
    with running_server(data, loaded) as (c, server):
        assert c.resume("s").tokens == before.tokens
        assert _tier_tokens(c, "s") == dict(before.tier_tokens)
        assert c.stats().model_tokens_processed == 0  # the cache came back from the store, nothing recomputed
        resumed = list(c.generate_text("s", max_new_tokens=REPLY).token_ids)
        prompt = _prompt(server, "s", loaded.tokenizer)
        opening = len(prompt) - before.tokens  # the template's assistant opening
        # the pending last token, the opening and the reply but its last token: no history token again
        assert c.stats().model_tokens_processed == 1 + opening + REPLY - 1
        # the same conversation on a session that never left this server's memory
        assert _converse(c, "control", policy) == first_reply
        control = list(c.generate_text("control", max_new_tokens=REPLY).token_ids)
        if policy == "tiered":  # one turn (< sink + hot tokens) is held exactly: transformers' own reply
            c.create_session("short", policy=policy)
            c.append("short", messages=_turns()[0])
            short = list(c.generate_text("short", max_new_tokens=REPLY).token_ids)
            assert _tier_tokens(c, "short")["cold"] == 0 == _tier_tokens(c, "short")["warm"]
            assert short == hf_greedy(model_dir, _prompt(server, "short", loaded.tokenizer), REPLY)
    assert resumed == control
    assert len(set(resumed)) > 1  # a model that answers the context, not one token over and over
    if policy == "full":  # exact: transformers' greedy reply to the same ids, before and after the restart
        first = _first_prompt_ids(loaded.tokenizer)
        assert prompt[:len(first)] == first
        assert first_reply == hf_greedy(model_dir, first, REPLY)
        assert resumed == hf_greedy(model_dir, prompt, REPLY)


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_full_policy_honours_a_sliding_window_narrower_than_the_session(tmp_path, real_model_dir, family):
    """A window of 128 (every Mistral layer; every other Gemma-2 layer): the full cache keeps every token and
    the SDPA mask hides those past the window, as transformers' own (windowed) cache does."""
    from memsvc.model import load_model

    narrow = make_family_model(tmp_path / "narrow", real_model_dir, family, sliding_window=128)
    loaded = load_model(str(narrow))
    with running_server(tmp_path / "data", loaded) as (c, server):
        _converse(c, "s", "full")
        reply = list(c.generate_text("s", max_new_tokens=REPLY).token_ids)
        prompt = _prompt(server, "s", loaded.tokenizer)
    assert reply == hf_greedy(narrow, prompt, REPLY)
    wide = make_family_model(tmp_path / "wide", real_model_dir, family)  # the same weights, window 4,096
    assert hf_greedy(wide, prompt, REPLY) != reply  # the window changes the answer: the check above has teeth


def test_tiered_policy_refuses_a_sliding_window_it_cannot_honour(tmp_path, real_model_dir):
    """The tiered cache attends every token it holds: past a layer's window it would attend what the model
    never sees, so the Append that crosses it fails (FAILED_PRECONDITION, nothing stored); within the window,
    and with the full policy, the same model serves."""
    from memsvc.model import load_model

    loaded = load_model(str(make_family_model(tmp_path / "m", real_model_dir, "mistral", sliding_window=128)))
    with running_server(tmp_path / "data", loaded) as (c, _):
        c.create_session("t", policy="tiered")
        c.append("t", text=essay_text(300))
        n = c.get_session("t").tokens
        assert 0 < n < 128
        with pytest.raises(grpc.RpcError) as err:
            c.append("t", text=essay_text(1000)[300:])
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "sliding window of 128 tokens" in err.value.details()
        assert c.get_session("t").tokens == n
        assert len(c.generate_text("t", max_new_tokens=4).token_ids) == 4
        c.create_session("f", policy="full")
        c.append("f", text=essay_text(1000))
        assert c.get_session("f").tokens > 128

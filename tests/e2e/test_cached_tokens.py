"""Prefix caching as clients see it (issue 23), on the shared tiny app through Serve's proxies
with the official clients: the generated gRPC stub (Usage.cached_tokens) and the openai SDK
(usage.prompt_tokens_details.cached_tokens), unary and streamed, chat and completions. A
known sequence of requests gives exact counts: a prompt of P tokens sent again reuses its
(P - 1) // 16 full blocks (the CPU engine's block size; the last prompt token is always
computed), a prompt sharing k full blocks with an earlier one reuses k * 16 tokens, a request
asking for prompt logprobs reuses none, and a reply from the cache equals the one computed.
Each test's prompts start with its own random tokens, so tests never hit each other's blocks.
tests/e2e/test_metrics.py checks the prefix cache's counters."""
from __future__ import annotations

import random
import uuid

import pytest

from model.tokenizer import Tokenizer
from protos import generator_pb2 as pb

openai = pytest.importorskip("openai")

MODEL = "tiny"                  # the shared app's (tests/e2e/conftest.py: TINY_MODEL)
BLOCK = 16                      # KV block size of the CPU engine (model/engine.py)


def reusable(prompt_tokens: int, shared_blocks: int | None = None) -> int:
    """Tokens a prompt takes from the cache when its first `shared_blocks` full blocks (all of
    them: None) are cached: never its last token."""
    most = (prompt_tokens - 1) // BLOCK
    return min(most, most if shared_blocks is None else shared_blocks) * BLOCK


def fresh_ids(n: int) -> list[int]:
    """`n` random token ids no other test sends."""
    rng = random.Random(uuid.uuid4().int)
    return [rng.randrange(1000, 31000) for _ in range(n)]


@pytest.fixture(scope="module")
def server(tiny_app):
    assert tiny_app.model == MODEL
    return tiny_app.stub


@pytest.fixture(scope="module")
def client(server, http_port):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused",
                         max_retries=0, timeout=60)


def request(ids: list[int], **fields) -> pb.GenerateRequest:
    return pb.GenerateRequest(**{"prompt_token_ids": ids, "max_tokens": 4, "temperature": 0.0,
                                 **fields})


def test_grpc_generate_and_stream_report_the_cached_prefix(server):
    shared = fresh_ids(3 * BLOCK)
    a = shared + fresh_ids(5)                                # 53 tokens: 3 full blocks
    first = server.Generate(request(a), timeout=60)
    again = server.Generate(request(a), timeout=60)
    assert (first.usage.prompt_tokens, first.usage.cached_tokens) == (53, 0)
    assert again.usage.cached_tokens == reusable(53) == 48
    assert list(again.token_ids) == list(first.token_ids)   # from the cache: the same reply
    b = shared[:2 * BLOCK] + fresh_ids(20)                   # shares 2 full blocks with a
    parts = list(server.GenerateStream(request(b), timeout=60))
    assert [p.usage for p in parts if p.HasField("usage")] == [
        pb.Usage(prompt_tokens=52, completion_tokens=4, cached_tokens=32)]
    two = server.Generate(request(a, n=2, seed=3, temperature=1.0), timeout=60)
    assert two.usage.cached_tokens == 48 and len(two.choices) == 2     # the prompt once
    scored = server.Generate(request(a, prompt_logprobs=0), timeout=60)
    assert scored.usage.cached_tokens == 0 and len(scored.prompt_logprobs) == 53


def test_completions_report_cached_tokens_unary_and_streamed(client):
    a = fresh_ids(40)

    def complete(prompt, **kw):
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=3,
                                         temperature=0, **kw)
    first = complete(a)
    assert first.usage.prompt_tokens == 40 and first.usage.prompt_tokens_details.cached_tokens == 0
    chunks = list(complete(a, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 40
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == reusable(40) == 32
    assert "".join(c.choices[0].text for c in chunks if c.choices) == first.choices[0].text
    shorter = complete(a[:BLOCK + 4])                        # its one full block is a's first
    assert shorter.usage.prompt_tokens_details.cached_tokens == BLOCK


def test_chat_reports_cached_tokens_for_a_repeated_and_a_continued_conversation(
        client, tiny_checkpoint):
    """A conversation's next turn starts with the whole previous prompt: it reuses the full
    blocks it has in common with the previous request's computed tokens (its prompt and every
    generated token but the last, whose keys were never computed)."""
    template = Tokenizer.from_pretrained(tiny_checkpoint).apply_chat_template
    system = f"Session {uuid.uuid4().hex}. " + "Answer in one short sentence, politely. " * 4
    turn = [{"role": "system", "content": system}, {"role": "user", "content": "Hi there"}]

    def chat(messages, **kw):
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3,
                                              temperature=0, **kw)
    first = chat(turn, extra_body={"return_token_ids": True})
    prompt = template(turn)
    assert first.usage.prompt_tokens == len(prompt) > 2 * BLOCK
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    chunks = list(chat(turn, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == reusable(len(prompt))
    assert chunks[-1].usage.completion_tokens == first.usage.completion_tokens
    follow = turn + [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "And then?"}]
    computed = prompt + first.choices[0].token_ids[:-1]
    nxt, common = template(follow), 0
    while common < min(len(nxt), len(computed)) and nxt[common] == computed[common]:
        common += 1
    got = chat(follow).usage
    assert got.prompt_tokens == len(nxt) and common >= len(prompt)     # the template extends it
    assert got.prompt_tokens_details.cached_tokens == reusable(len(nxt), common // BLOCK) > 0


def test_a_cache_salt_shares_blocks_only_with_requests_of_the_same_salt(server, client):
    """vLLM's `cache_salt` (gRPC field, HTTP body field): a tenant's cached prompt is a miss
    for a request without its salt or with another, a hit for one with the same."""
    a = fresh_ids(40)

    def grpc_cached(**salt) -> int:
        return server.Generate(request(a, **salt), timeout=60).usage.cached_tokens

    def http_cached(**salt) -> int:
        reply = client.completions.create(model=MODEL, prompt=a, max_tokens=3, temperature=0,
                                          extra_body=salt)
        return reply.usage.prompt_tokens_details.cached_tokens
    assert grpc_cached(cache_salt="tenant-a") == 0
    assert http_cached() == 0 and grpc_cached(cache_salt="tenant-b") == 0
    assert http_cached(cache_salt="tenant-a") == grpc_cached(cache_salt="tenant-a") == 32
    assert grpc_cached() == 32                       # the unsalted request above filled it

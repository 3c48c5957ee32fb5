"""Shared fixtures: random checkpoints written by transformers (the oracle) and by us; the Python
code of README.md and docs/**/*.md, found by document and heading, for the tests that run it."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)
logging.getLogger("model").setLevel(logging.WARNING)

TESTS = Path(__file__).resolve().parent
# the lanes, cheapest first: a broken unit test is reported in seconds (Makefile: make test-*)
LANES = ("unit", "integration", "e2e", "gpu")
# fixtures that hand consecutive tests one engine or Serve application (tests/integration and
# tests/e2e conftest.py): their tests run first in their lane, next to each other, so it starts once
SHARED_FIXTURES = {"tiny_ray_engine", "tiny_app"}


def _lane_order(item: pytest.Item) -> tuple[int, bool]:
    """(the item's lane in LANES, False if it uses a shared engine or app); unknown paths last."""
    path = item.path.resolve()
    parts = path.relative_to(TESTS).parts if path.is_relative_to(TESTS) else ()
    lane = LANES.index(parts[0]) if parts and parts[0] in LANES else len(LANES)
    return lane, not SHARED_FIXTURES & set(item.fixturenames)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Lanes in LANES order and, within a lane, the users of a shared fixture first; otherwise
    the order stays as collected (a stable sort)."""
    items.sort(key=_lane_order)


TINY_HF = dict(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
               num_experts_per_tok=2, max_position_embeddings=1024, sliding_window=None)
# transformers' init (std 0.02) leaves these tiny models' attention almost uniform, so a wrong
# RoPE position moves the logits by less than the parity tolerance: q and k are scaled by this
# after init, which makes the scores' spread ~100x larger and each query attend to a few keys.
QK_SCALE = 10.0


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """Write a random transformers MixtralForCausalLM (sharded) and return (model, path).

    Cached per config for the session: call with overrides of TINY_HF."""
    transformers = pytest.importorskip("transformers")
    cache = {}

    def make(**overrides):
        key = tuple(sorted(overrides.items()))
        if key not in cache:
            torch.manual_seed(len(cache) + 1)
            cfg = transformers.MixtralConfig(**(TINY_HF | overrides))
            model = transformers.MixtralForCausalLM(cfg).eval()
            with torch.no_grad():
                for layer in model.model.layers:
                    layer.self_attn.q_proj.weight.mul_(QK_SCALE)
                    layer.self_attn.k_proj.weight.mul_(QK_SCALE)
            path = tmp_path_factory.mktemp("hf")
            model.save_pretrained(path, max_shard_size="4MB")
            cache[key] = (model, path)
        return cache[key]

    return make


def _random_checkpoint(tmp_path_factory, preset: str):
    from model.config import PRESETS
    from model.random_checkpoint import write_random
    return write_random(PRESETS[preset], tmp_path_factory.mktemp(preset), seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Our own `tiny` random checkpoint, with tokenizer files."""
    return _random_checkpoint(tmp_path_factory, "tiny")


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory):
    """The `small` preset (hidden 512, 8 layers; 0.86 GB in fp32)."""
    return _random_checkpoint(tmp_path_factory, "small")


@pytest.fixture(scope="session")
def tiny_fp8_checkpoint():
    """The `tiny` random checkpoint in the published FP8 layout (model/random_checkpoint.py),
    written once under the cache dir."""
    from model.random_checkpoint import cached_random_checkpoint
    return cached_random_checkpoint("tiny", quantization="fp8")


@pytest.fixture(scope="session")
def dequantized_engine():
    """(path, quantization=None) -> the oracle of a quantized engine: a float32 CPU Engine whose
    weights are the checkpoint's as this server loads them (an FP8 checkpoint's projections, or
    with "int8" the quantized experts) dequantized to plain float32 tensors."""
    from model.checkpoint import WeightSource
    from model.engine import Engine
    from model.linear import dense
    from model.mixtral import Mixtral, tensor_shapes
    from model.moe import LocalExperts
    from model.tokenizer import Tokenizer

    def make(path, quantization: str | None = None) -> Engine:
        source = WeightSource(path=str(path), quantization=quantization)
        cfg = source.model_config()
        tensors = {n: dense(w) for n, w in
                   source.load(list(tensor_shapes(cfg)), torch.float32).items()}
        experts = LocalExperts.from_tensors(cfg, tensors)         # pops the expert tensors
        return Engine(Mixtral.from_tensors(cfg, tensors), experts.moe,
                      Tokenizer.from_pretrained(path), moe_begin=experts.moe_begin)
    return make


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint):
    from model.engine import Engine
    return Engine.from_pretrained(tiny_checkpoint, max_num_batched_tokens=64)


# bf16 keeps 8 significant bits. On the tiny checkpoint (q/k init x QK_INIT_GAIN, so attention
# scores are large and their rounding moves them most) bf16 logits on the CPU were within
# 1.0-6.1% of fp32's logit scale, the same with and without oneDNN's packed bf16 GEMMs; a wrong
# position or kernel moves them by ~100%. Greedy tokens already differ at near-ties (fp32 top-2
# gaps of 2e-5 of the scale), so tokens are compared by their fp32 logit, not for equality.
BF16_REL = 0.1


@pytest.fixture(scope="session")
def assert_bf16_close():
    """(bf16 engine, fp32 engine, prompts, rel=BF16_REL): every prompt's logits within `rel` of
    the fp32 logit scale, and each greedy token bf16 decodes (its KV cache in bf16) within `rel`
    of the best fp32 logit on the same prefix. (Another lower precision passes its own `rel`.)"""
    def check(bf16, fp32, prompts: list[str], rel: float = BF16_REL) -> None:
        ids = [fp32.tokenizer.encode(p) for p in prompts]
        for got, want in zip(bf16.logits(ids), fp32.logits(ids)):
            scale = want.abs().max().item()
            assert (got.float().cpu() - want.float().cpu()).abs().max().item() <= rel * scale
        outs = bf16.generate(ids, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
        for prompt, out in zip(ids, outs):
            ref = fp32.logits(prompt + out.token_ids[:-1])[len(prompt) - 1:]         # (16, V)
            chosen = ref.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]      # (16,)
            shortfall = (ref.max(1).values - chosen).max().item()
            assert shortfall <= rel * ref.abs().max().item(), (out.token_ids, shortfall)
    from model.engine import SamplingParams
    return check


def _alive_actors(class_name: str | None = None) -> list[dict]:
    """ALIVE actors (of a class, or all), from the GCS's actor table (as cluster/placement.py
    reads resources: the state API needs the dashboard, which can take longer than a test to
    answer on a loaded machine)."""
    import ray
    return [a for a in ray._private.state.actors(actor_state_name="ALIVE").values()
            if class_name is None or a["ActorClassName"] == class_name]


@pytest.fixture
def alive_actors():
    """alive_actors(class_name=None) -> the ALIVE actors of that class, or all (GCS
    actor-table entries: ActorID, Pid, Address, OwnerAddress...)."""
    return _alive_actors


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster: a head offering `frontend` and 3 nodes offering 6 `expert`
    slots each; shared by the integration and e2e tests."""
    from cluster.local import local_cluster
    with local_cluster(expert_nodes=3, expert_slots=6) as cluster:
        yield cluster


ROOT = Path(__file__).resolve().parents[1]
# the documents whose ```python blocks the tests run, as paths relative to ROOT
DOCS = ("README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md")))
NEEDS_CUDA = "# needs CUDA"     # a doc's code line carrying this comment runs only with CUDA
_FENCE = re.compile(r"^```\s*(\S*)")
_HEADING = re.compile(r"^#+\s+(.*\S)")


def _python_sections(text: str) -> dict[str, str]:
    """Each heading's ```python code (its blocks joined, in order), headings outside code."""
    sections: dict[str, list[str]] = {}
    heading, fence = "", None           # fence: the open block's language, None outside blocks
    for line in text.splitlines():
        if (m := _FENCE.match(line)) is not None:
            fence = m.group(1) if fence is None else None
            if fence in ("python", "py"):
                sections.setdefault(heading, [])
        elif fence is None and (m := _HEADING.match(line)):
            heading = m.group(1)
        elif fence in ("python", "py"):
            sections[heading].append(line)
    return {h: "\n".join(lines) + "\n" for h, lines in sections.items()}


@pytest.fixture(scope="session")
def python_sections():
    """Markdown text -> {heading: its Python code}: how a document's code is found."""
    return _python_sections


@pytest.fixture(scope="session")
def docs_python(python_sections) -> dict[str, dict[str, str]]:
    """{document (DOCS, e.g. "docs/api.md"): {heading: its Python code}}, documents with none
    included (an empty dict)."""
    return {doc: python_sections((ROOT / doc).read_text(encoding="utf-8")) for doc in DOCS}


@pytest.fixture(scope="session")
def readme_python(docs_python) -> dict[str, str]:
    """The README's Python code by the heading it is under."""
    return docs_python["README.md"]


@pytest.fixture
def doc_code(docs_python, tmp_path, monkeypatch):
    """(doc, heading, cuda=False) -> that heading's code in `doc` (a DOCS path) as it is run
    here, lines marked NEEDS_CUDA dropped unless `cuda`; MIXTRAL_EP_CACHE (the demo checkpoint)
    goes to tmp_path. KeyError for a document or heading with no Python code."""
    monkeypatch.setenv("MIXTRAL_EP_CACHE", str(tmp_path / "cache"))

    def code(doc: str, heading: str, cuda: bool = False) -> str:
        full = docs_python[doc][heading]
        compile(full, f"{doc} ({heading})", "exec")     # CUDA lines must parse everywhere
        return "".join(line for line in full.splitlines(keepends=True)
                       if cuda or NEEDS_CUDA not in line)
    return code


@pytest.fixture
def readme_code(doc_code):
    """(heading, cuda=False) -> that heading's README code as it is run here (doc_code)."""
    return lambda heading, cuda=False: doc_code("README.md", heading, cuda)

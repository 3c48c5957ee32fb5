"""CUDA paths: the same checkpoint on GPU equals the CPU engine; flash-attn equals SDPA; the
expert data plane on CUDA (pinned host copies) equals the in-process CUDA engine.
Skipped (never faked) without a CUDA device."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from model.engine import Engine, SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
needs_flash = pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None,
                                 reason="flash-attn is not installed")
PROMPTS = ["Hello, my name is", "The capital of France is a city that", "def f(x):\n    return"]


@pytest.fixture(scope="module")
def cpu_engine(tiny_checkpoint):
    return Engine.from_pretrained(tiny_checkpoint)


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    scale = b.abs().max().item()
    assert (a.float().cpu() - b.float().cpu()).abs().max().item() <= rel * scale


def _assert_equal_engines(engine, reference, rel: float) -> None:
    """Logits within `rel` of the reference's logit scale; greedy tokens equal."""
    ids = [reference.tokenizer.encode(p) for p in PROMPTS]
    for got, want in zip(engine.logits(ids), reference.logits(ids)):
        _close(got, want, rel)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    assert ([o.token_ids for o in engine.generate(PROMPTS, params)]
            == [o.token_ids for o in reference.generate(PROMPTS, params)])


@pytest.mark.parametrize("backend", ["sdpa", pytest.param("flash", marks=needs_flash)])
def test_fp32_cuda_equals_cpu(tiny_checkpoint, cpu_engine, backend):
    gpu = Engine.from_pretrained(tiny_checkpoint, device="cuda", attention_backend=backend)
    _assert_equal_engines(gpu, cpu_engine, 1e-4)


@needs_flash
def test_flash_equals_sdpa_bf16_with_window(tiny_checkpoint):
    import dataclasses

    from model.config import PRESETS
    cfg = dataclasses.replace(PRESETS["tiny"], sliding_window=5)
    engines = [Engine.from_config(cfg, dtype="bfloat16", device="cuda", attention_backend=b)
               for b in ("flash", "sdpa")]
    ids = [engines[0].tokenizer.encode(p) for p in PROMPTS]
    for a, b in zip(*(e.logits(ids) for e in engines)):
        _close(a, b, 2e-2)


def test_bf16_cuda_close_to_fp32(tiny_checkpoint, cpu_engine, assert_bf16_close):
    """bf16 on CUDA against fp32 on the CPU (tests/conftest.py: assert_bf16_close)."""
    gpu = Engine.from_pretrained(tiny_checkpoint, device="cuda", dtype="bfloat16")
    assert_bf16_close(gpu, cpu_engine, PROMPTS)


def test_the_sampler_pipeline_and_n_choices_on_cuda_equal_the_cpu(tiny_checkpoint, cpu_engine):
    """Penalties, logit bias, min_tokens, top and prompt logprobs (greedy) on CUDA equal the
    CPU's; n seeded choices (their shared blocks copied on write on the GPU) each equal the
    CUDA engine's request seeded as that choice."""
    from model.sampling import choice_seed
    gpu = Engine.from_pretrained(tiny_checkpoint, device="cuda", block_size=4)
    greedy = SamplingParams(max_tokens=16, temperature=0.0, min_tokens=8, top_logprobs=5,
                            prompt_logprobs=3, repetition_penalty=1.3, presence_penalty=0.5,
                            frequency_penalty=0.4, logit_bias={13: 5.0, 28723: -100.0})
    for got, want in zip(gpu.generate(PROMPTS, greedy), cpu_engine.generate(PROMPTS, greedy)):
        assert got.token_ids == want.token_ids
        assert got.logprobs == pytest.approx(want.logprobs, abs=1e-3)
        assert [[t for t, _ in top] for top in got.top_logprobs] == \
            [[t for t, _ in top] for top in want.top_logprobs]
        assert got.prompt_logprobs[0] is None and want.prompt_logprobs[0] is None
        assert [e[0] for e in got.prompt_logprobs[1:]] == \
            pytest.approx([e[0] for e in want.prompt_logprobs[1:]], abs=1e-3)
    sampled = SamplingParams(max_tokens=12, seed=5, n=4, top_k=40, top_p=0.9, ignore_eos=True)
    choices = gpu.generate(PROMPTS[1], sampled)
    for i, choice in enumerate(choices):
        alone = SamplingParams(max_tokens=12, seed=choice_seed(5, i), top_k=40, top_p=0.9,
                               ignore_eos=True)
        assert choice.token_ids == gpu.generate(PROMPTS[1], alone)[0].token_ids


def test_rows_cross_the_channel_as_pinned_host_copies():
    """actors/experts/channel.py: CUDA rows go to page-locked host memory and back, unchanged."""
    from actors.experts.channel import device_rows, empty_host_like, host_rows
    x = torch.randn(5, 8, device="cuda")
    host = host_rows(x)
    assert host.device.type == "cpu" and host.is_pinned() and torch.equal(host, x.cpu())
    assert empty_host_like(host).is_pinned()
    for rows in (host, x.cpu()):                    # pinned (a reply), pageable (a ZeroMQ frame)
        back = device_rows(rows, x.device)
        torch.cuda.synchronize()
        assert back.device == x.device and torch.equal(back, x)


@pytest.mark.parametrize("transport", ["channel", "object_refs"])
def test_ray_engine_on_cuda_equals_the_cuda_engine(tiny_checkpoint, transport):
    """Frontend and 8 expert actors sharing the GPU (0.1 each): the rows cross as pinned host
    copies, and logits and greedy tokens equal the in-process CUDA engine's."""
    import ray

    from actors import RayEngine
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_gpus=torch.cuda.device_count(), include_dashboard=False)
    share = {"CPU": 0.01, "GPU": 0.1}
    engine = RayEngine.from_pretrained(tiny_checkpoint, device="cuda", expert_resources=share,
                                       frontend_resources=share, transport=transport)
    try:
        _assert_equal_engines(engine, Engine.from_pretrained(tiny_checkpoint, device="cuda"), 1e-5)
    finally:
        engine.shutdown()
        if started:
            ray.shutdown()


# ---- quantized weights (model/quant.py) ------------------------------------------------------
needs_fp8_gemm = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="torch._scaled_mm needs FP8 tensor cores (compute capability 8.9+)")
# An FP8 checkpoint with _scaled_mm quantizes every projection's input to FP8 (4 significant
# bits) against its dequantized weights in fp32: measured with torch._scaled_mm on the CPU (the
# same quantization of x, tests/unit/test_quant.py), the tiny FP8 checkpoint's logits on PROMPTS
# were within 0.048-0.17 of the logit scale (tiny's attention scores are large: q, k x8), each
# greedy token within 0.011-0.023 of the best fp32 logit.
FP8_ACTIVATION_REL = 0.3


@needs_fp8_gemm
@pytest.mark.parametrize("scheme", ["static", "dynamic"])
def test_packed_fp8_weights_take_scaled_mm_and_match_their_dequantized_weight(scheme):
    """`pack` on CUDA sm_89+ sets `tensor_scale` (for torch._scaled_mm): of one checkpoint
    weight, its own scale; of w1 and w3 fused (two scales), their max, the rows of the smaller
    requantized. Each matmul within tests/quant_bounds.py `fp8_gemm_bound` of x @ W.T for the
    dequantized W, for 1 (decode), 5 and 32 rows."""
    from model import quant
    from tests.quant_bounds import fp8_gemm_bound
    gen = torch.Generator().manual_seed(0)
    w1, w3 = (0.02 * torch.randn(96, 128, generator=gen) * g for g in (1.0, 0.3))
    parts = [quant.quantize_fp8(w) for w in (w1, w3)]
    for rows in (1, 5, 32):
        x = torch.randn(rows, 128, generator=gen)
        static = float(x.abs().max()) * 1.5 / quant.FP8_MAX if scheme == "static" else None
        scale_in = None if static is None else torch.tensor(static)
        one = quant.from_fp8_checkpoint(*parts[0], scale_in)
        fused = quant.concat([one, quant.from_fp8_checkpoint(*parts[1], scale_in)])
        for q, top in ((one, parts[0][1]), (fused, max(parts[0][1], parts[1][1]))):
            packed = quant.pack(q.to("cuda"))
            assert packed.tensor_scale is not None and packed.tensor_scale.cpu() == top
            y = packed.matmul(x.cuda())
            assert y.dtype == torch.float32 and y.shape == (rows, q.shape[0])
            wd = packed.to("cpu").dequantize(torch.float64)
            input_scale = static if static is not None else float(x.abs().max()) / quant.FP8_MAX
            bound = fp8_gemm_bound(x.double(), wd, input_scale)
            assert ((y.cpu().double() - x.double() @ wd.T).abs() <= bound).all()


def test_an_fp8_checkpoint_on_cuda_is_close_to_its_dequantized_weights(
        tiny_fp8_checkpoint, dequantized_engine, assert_bf16_close):
    """With torch._scaled_mm (sm_89+): within FP8_ACTIVATION_REL (tests/conftest.py
    assert_bf16_close: logits, and each greedy token's fp32 logit); weight-only elsewhere, the
    same products as fp32: logits within 1e-4 of the scale, greedy tokens equal."""
    from model import quant
    gpu = Engine.from_pretrained(tiny_fp8_checkpoint, device="cuda")
    fp8_gemm = quant.fp8_gemm_supported(gpu.device)
    qkv = gpu.model.model.layers[0].self_attn.qkv_proj.weight
    assert qkv.device.type == "cuda" and qkv.kind == "fp8"
    assert (qkv.tensor_scale is not None) == fp8_gemm
    cpu = dequantized_engine(tiny_fp8_checkpoint)
    if fp8_gemm:
        assert_bf16_close(gpu, cpu, PROMPTS, rel=FP8_ACTIVATION_REL)
    else:
        _assert_equal_engines(gpu, cpu, 1e-4)


def test_int8_experts_on_cuda_equal_their_dequantized_weights(tiny_checkpoint, dequantized_engine):
    """int8 experts on CUDA (weight-only: converted to fp32 per call, then scaled) against the
    same int8 weights dequantized on the CPU: the same products, logits within 1e-4 of the
    scale, greedy tokens equal."""
    gpu = Engine.from_pretrained(tiny_checkpoint, device="cuda", quantization="int8")
    w13, w2 = gpu.moe.__self__.weights[(0, 0)]
    assert w13.kind == w2.kind == "int8" and w13.device.type == "cuda"
    assert w13.kernel_scale is None            # the CPU kernel's bf16 scale: CPU only
    _assert_equal_engines(gpu, dequantized_engine(tiny_checkpoint, "int8"), 1e-4)

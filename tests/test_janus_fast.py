"""The fast Janus image-token decoder (`decode_path="fast"`) against the reference sampler `JanusBackend._sample`.

The tiny test model is sharpened (larger query/key and generation-head weights) so that its image-token
distributions are far from uniform and depend on positions and context: with the untouched tiny model a decoder with
wrong positions still draws the reference's tokens. `test_equivalence_is_sensitive` shows that the comparison would
catch such a bug.
"""

import math
import warnings

import pytest
import torch

from srum_trl.models import GenerationConfig, JanusBackend
from srum_trl.models.janus import fast as fast_module
from srum_trl.models.janus.fast import FastJanusDecoder, FastJanusSampler

PROMPTS = ["a red circle", "a blue square and a green triangle", "a red circle and a blue square and a red square"]
CONFIGS = [
    GenerationConfig(guidance=g, temperature=t, top_k=k)
    for g in (1.0, 3.0)
    for t in (1.0, 0.7)
    for k in (None, 5)
]


def _sharpen(model):
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
        model.model.generation_head.vision_head.weight.mul_(40)
    model.eval()
    return model


@pytest.fixture
def sharp_backend(tiny_janus):
    model, processor = tiny_janus
    return JanusBackend(_sharpen(model), processor)


def _reference(backend, prompts, config, seed):
    return backend._sample(prompts, config, torch.Generator().manual_seed(seed))


def _fast(backend, prompts, config, seed, **kwargs):
    return FastJanusSampler(backend, **kwargs)(prompts, config, torch.Generator().manual_seed(seed))


def _assert_same(ref, fast, guided, atol=1e-5):
    tokens, margin, logprobs = ref
    assert torch.equal(fast[0], tokens)
    torch.testing.assert_close(fast[2], logprobs, atol=atol, rtol=0)
    if guided:
        torch.testing.assert_close(fast[1], margin, atol=atol, rtol=0)
    else:
        assert torch.isnan(fast[1]).all() and torch.isnan(margin).all()


@pytest.mark.parametrize("pad_multiple", [1, 32])
def test_fast_equals_reference_on_cpu(sharp_backend, pad_multiple):
    """Same seed, float32, CPU: the same tokens for every (guidance, temperature, top_k); logprobs and margins to
    1e-5. Prompts of 4, 8 and 12 tokens (+BOS/BOI) exercise the left padding; pad_multiple=32 adds more of it."""
    for config in CONFIGS:
        ref = _reference(sharp_backend, PROMPTS, config, seed=5)
        fast = _fast(sharp_backend, PROMPTS, config, seed=5, pad_multiple=pad_multiple)
        _assert_same(ref, fast, guided=config.guidance != 1.0)
        assert ref[2].std() > 0.1  # the model is not uniform: the comparison means something


def test_generate_with_fast_decode_path(tiny_janus):
    model, processor = tiny_janus
    _sharpen(model)
    reference = JanusBackend(model, processor)
    fast = JanusBackend(model, processor, decode_path="fast")
    config = GenerationConfig(guidance=3.0, temperature=1.3, top_k=5, batch_size=2)
    prompts = PROMPTS + ["a green triangle"]
    r1, r2 = reference.generate(prompts, config, seed=3), fast.generate(prompts, config, seed=3)
    assert torch.equal(r1.tokens, r2.tokens)
    torch.testing.assert_close(r2.logprobs, r1.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(r2.guidance_margin, r1.guidance_margin, atol=1e-5, rtol=0)
    assert [im.tobytes() for im in r1.images] == [im.tobytes() for im in r2.images]
    with pytest.raises(ValueError, match="decode_path"):
        JanusBackend(model, processor, decode_path="graph")


def test_equivalence_is_sensitive(sharp_backend, monkeypatch):
    """A decoder that feeds image tokens at positions off by one draws other tokens: the token test catches it."""
    forward = FastJanusDecoder.forward

    def shifted(self, kv_len):
        self.last_pos += 1
        forward(self, kv_len)
        self.last_pos -= 1

    monkeypatch.setattr(FastJanusDecoder, "forward", shifted)
    differs = [not torch.equal(_reference(sharp_backend, PROMPTS, c, 5)[0], _fast(sharp_backend, PROMPTS, c, 5)[0])
               for c in CONFIGS[:2] + CONFIGS[4:6]]
    assert any(differs)


def test_step_allocates_no_new_cache(sharp_backend):
    """The cache object, its K/V tensors, the mask and the logits buffer keep their storage across every step, and
    across batches of the same shape (the decoder is reused)."""
    sampler = FastJanusSampler(sharp_backend, pad_multiple=32)
    seen = []

    def record(decoder, step):
        seen.append((id(decoder), id(decoder.cache), tuple(decoder.cache.data_ptrs()), decoder.mask.data_ptr(),
                     decoder.logits.data_ptr(), decoder.token_in.data_ptr(), decoder.tokens.data_ptr()))

    generator = torch.Generator().manual_seed(0)
    config = GenerationConfig(guidance=3.0)
    sampler(PROMPTS[:2], config, generator, step_callback=record)
    cache = sampler.decoder.cache
    sampler(PROMPTS[1:], config, generator, step_callback=record)  # other prompts, same padded shape
    assert len(seen) == 2 * sharp_backend.num_image_tokens
    assert len(set(seen)) == 1
    assert sampler.decoder.cache is cache and sampler.decoders_built == 1
    n_layers = len(sharp_backend.core.model.language_model.layers)
    assert len(cache.keys) == len(cache.values) == n_layers
    assert cache.keys[0].shape[0] == 4  # cond + uncond rows of 2 prompts
    sampler(PROMPTS, config, generator)  # a new shape replaces the decoder
    assert sampler.decoders_built == 2


def test_step_functions_are_idempotent(sharp_backend, monkeypatch):
    """CUDA graphs are captured lazily, mid-decode, after two warm-up runs of the step: running every step function
    three times must change nothing."""
    config = GenerationConfig(guidance=3.0, temperature=0.7, top_k=5)
    once = {mode: _fast(sharp_backend, PROMPTS, config, 4, sampling=mode) for mode in ("host", "device")}

    def thrice(self, key, fn):
        fn()
        fn()
        fn()

    monkeypatch.setattr(fast_module._GraphRunner, "__call__", thrice)
    for mode in ("host", "device"):
        again = _fast(sharp_backend, PROMPTS, config, 4, sampling=mode)
        _assert_same(once[mode], again, guided=True, atol=0)
    _assert_same(_reference(sharp_backend, PROMPTS, config, 4), once["host"], guided=True)


def test_device_sampling_on_cpu(sharp_backend):
    """The "device" sampler (exponential race, no host synchronisation) on the CPU: greedy equals the reference,
    sampled logprobs equal the teacher-forced scores, runs are reproducible per seed."""
    for guidance in (1.0, 3.0):
        greedy = GenerationConfig(guidance=guidance, top_k=1)
        assert torch.equal(_fast(sharp_backend, PROMPTS, greedy, 0, sampling="device")[0],
                           _reference(sharp_backend, PROMPTS, greedy, 0)[0])
    config = GenerationConfig(guidance=3.0, temperature=1.3)
    a = _fast(sharp_backend, PROMPTS, config, 1, sampling="device")
    b = _fast(sharp_backend, PROMPTS, config, 1, sampling="device")
    c = _fast(sharp_backend, PROMPTS, config, 2, sampling="device")
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    from srum_trl.models import Rollout

    rollout = Rollout(prompts=PROMPTS, images=[], tokens=a[0], grid=sharp_backend.token_grid, guidance=3.0,
                      temperature=1.3, logprobs=a[2], guidance_margin=a[1])
    torch.testing.assert_close(sharp_backend.token_logprobs(PROMPTS, rollout), a[2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sharp_backend.guidance_margin(PROMPTS, rollout), a[1], atol=1e-4, rtol=1e-4)


def test_exponential_race_samples_the_distribution(sharp_backend):
    """argmax(p / E), E ~ Exp(1), draws token j with probability p_j, and never a token cut by top-k."""
    decoder = FastJanusDecoder(sharp_backend, batch=512, prompt_len=4, guided=False)
    vocab = decoder.logits.shape[1]
    torch.manual_seed(0)
    decoder.logits.copy_(torch.randn(vocab).mul(1.5).expand(512, vocab))
    generator = torch.Generator().manual_seed(0)
    for top_k in (None, 8):
        _, probs, _, _ = fast_module.guided_scores(decoder.logits, 1.0, 1.0, top_k)
        counts = torch.zeros(vocab)
        for _ in range(16):
            decoder.noise.exponential_(generator=generator)
            decoder.sample_on_device(1.0, 1.0, top_k)
            counts += torch.bincount(decoder.tokens[:, 0], minlength=vocab)
        freq = counts / counts.sum()
        n = counts.sum()
        assert ((freq - probs[0]).abs() <= 5 * (probs[0] * (1 - probs[0]) / n).sqrt() + 1e-3).all()
        if top_k is not None:
            assert (counts[probs[0] == 0] == 0).all()


PARTIAL_TARGETS = r".*language_model.*\.(q_proj|v_proj|up_proj|down_proj)"
ALL_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def _lora_backend(tiny_janus, targets=PARTIAL_TARGETS, **lora_kwargs):
    peft = pytest.importorskip("peft")
    model, processor = tiny_janus
    lora = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets, **lora_kwargs)
    return peft.get_peft_model(_sharpen(model), lora), processor


@pytest.mark.parametrize("merge", [True, False])
def test_eager_attention_and_lora(tiny_janus, merge):
    """Eager attention and injected LoRA layers are honoured, with the adapters merged into copies of the adapted
    weights for the decode steps (default) or run as PEFT's layers; and with the adapters switched off."""
    wrapped, processor = _lora_backend(tiny_janus)
    wrapped.base_model.model.set_attn_implementation("eager")
    backend = JanusBackend(wrapped, processor)
    config = GenerationConfig(guidance=3.0, temperature=0.7)
    _assert_same(_reference(backend, PROMPTS, config, 9), _fast(backend, PROMPTS, config, 9, merge_adapters=merge),
                 guided=True)
    with backend.frozen():
        _assert_same(_reference(backend, PROMPTS, config, 9),
                     _fast(backend, PROMPTS, config, 9, merge_adapters=merge), guided=True)


@pytest.mark.parametrize("targets", [PARTIAL_TARGETS, ALL_TARGETS])
def test_merged_adapters_follow_training_updates(tiny_janus, targets):
    """A kept decoder merges the adapters again at every call: after an in-place update of the LoRA weights (what an
    optimizer step does) it draws the tokens of the updated model, not of the weights it merged first. With every
    projection adapted, q/k/v and gate/up are also fused ("auto"): their slices follow the updates too."""
    wrapped, processor = _lora_backend(tiny_janus, targets)
    backend = JanusBackend(wrapped, processor, decode_path="fast", keep_fast_decoder=True)
    config = GenerationConfig(guidance=3.0, temperature=0.7)
    first = backend.generate(PROMPTS, config, seed=4)
    decoder = backend._fast_sampler.decoder
    fused = targets == ALL_TARGETS
    assert len(decoder.weights.parts) == 2 * (7 if fused else 4)  # merged projections x 2 layers
    view = decoder.step_layers[0]
    assert hasattr(view.self_attn, "qkv_proj") == fused == hasattr(view.mlp, "gate_up_proj")
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn_like(param))
    after = backend.generate(PROMPTS, config, seed=4)
    assert backend._fast_sampler.decoder is decoder  # reused, not rebuilt
    assert torch.equal(after.tokens, _reference(backend, PROMPTS, config, 4)[0])
    assert not torch.equal(after.tokens, first.tokens)  # the update matters: stale merged weights would show


def test_lora_variants_keep_peft_forward(tiny_janus):
    """DoRA cannot be merged by adding `B A`: its projections run PEFT's forward; the tokens stay the reference's."""
    wrapped, processor = _lora_backend(tiny_janus, use_dora=True)
    backend = JanusBackend(wrapped, processor)
    config = GenerationConfig(guidance=3.0, temperature=0.7)
    sampler = FastJanusSampler(backend)
    got = sampler(PROMPTS, config, torch.Generator().manual_seed(6))
    assert sampler.decoder.weights.parts == []
    assert sampler.decoder.step_layers[0].self_attn.q_proj is sampler.decoder.layers[0].self_attn.q_proj
    _assert_same(_reference(backend, PROMPTS, config, 6), got, guided=True)


def test_rejects_unsupported_attention(tiny_backend):
    config = tiny_backend.core.model.language_model.config
    previous = config._attn_implementation_internal
    config._attn_implementation_internal = "flash_attention_2"
    try:
        with pytest.raises(ValueError, match="'sdpa' or 'eager'"):
            FastJanusDecoder(tiny_backend, batch=1, prompt_len=4, guided=False)
    finally:
        config._attn_implementation_internal = previous


# ------------------------------------------------------------------------------------------------------ CUDA
def _to_cuda(tiny_janus):
    model, processor = tiny_janus
    return JanusBackend(_sharpen(model).to("cuda"), processor)


@pytest.mark.gpu
def test_cuda_graphs_with_host_sampling_equal_reference(tiny_janus):
    """On CUDA in float32 the captured graphs with the reference's CPU random numbers draw the reference's tokens."""
    backend = _to_cuda(tiny_janus)
    for config in CONFIGS:
        sampler = FastJanusSampler(backend, sampling="host")
        ref = _reference(backend, PROMPTS, config, 5)
        fast = sampler(PROMPTS, config, torch.Generator().manual_seed(5))
        assert sampler.decoder.graphs.enabled and sampler.decoder.graphs.captures > 0
        # CUDA kernels (SDPA over masked slots vs a growing cache) round differently from the CPU: looser log-probs
        _assert_same(tuple(t.cpu() for t in ref), tuple(t.cpu() for t in fast), guided=config.guidance != 1.0,
                     atol=1e-4)


@pytest.mark.gpu
def test_cuda_device_sampling(tiny_janus):
    backend = _to_cuda(tiny_janus)
    greedy = GenerationConfig(guidance=3.0, top_k=1)
    assert torch.equal(_fast(backend, PROMPTS, greedy, 0)[0].cpu(), _reference(backend, PROMPTS, greedy, 0)[0].cpu())
    config = GenerationConfig(guidance=3.0, temperature=1.3)
    sampler = FastJanusSampler(backend)
    seen = []
    a = sampler(PROMPTS, config, torch.Generator().manual_seed(1),
                step_callback=lambda d, i: seen.append((id(d.cache), tuple(d.cache.data_ptrs()))))
    assert len(set(seen)) == 1 and sampler.decoder.graphs.captures > 0
    b = _fast(backend, PROMPTS, config, 1)
    assert torch.equal(a[0], b[0])
    from srum_trl.models import Rollout

    rollout = Rollout(prompts=PROMPTS, images=[], tokens=a[0].cpu(), grid=backend.token_grid, guidance=3.0,
                      temperature=1.3)
    torch.testing.assert_close(backend.token_logprobs(PROMPTS, rollout).cpu(), a[2].cpu(), atol=1e-4, rtol=1e-4)
    assert not math.isnan(a[1].sum().item())


# ------------------------------------------------------------------------------------------- kept decoder
def _kept_backend(tiny_janus, device="cpu"):
    model, processor = tiny_janus
    return JanusBackend(_sharpen(model).to(device), processor, decode_path="fast", keep_fast_decoder=True)


def test_kept_decoder_is_reused_and_draws_what_a_fresh_one_draws(tiny_janus):
    """Kept between calls: the same sampler and decoder serve the next call of the same shape, and for each seed
    the tokens equal those of a fresh decoder (the reference's, on the CPU), also after the weights changed in place
    (as an optimizer step changes them)."""
    kept = _kept_backend(tiny_janus)
    fresh = JanusBackend(kept.model, kept.processor, decode_path="fast")
    config = GenerationConfig(guidance=3.0, temperature=0.9, batch_size=3)
    first = kept.generate(PROMPTS, config, seed=1)
    sampler, decoder = kept._fast_sampler, kept._fast_sampler.decoder
    for seed in (1, 2):
        assert torch.equal(kept.generate(PROMPTS, config, seed=seed).tokens, fresh.generate(PROMPTS, config, seed).tokens)
    assert kept._fast_sampler is sampler and sampler.decoder is decoder and sampler.decoders_built == 1
    assert torch.equal(kept.generate(PROMPTS, config, seed=1).tokens, first.tokens)
    with torch.no_grad():
        kept.core.model.generation_head.vision_head.weight.mul_(1.5)  # in place: same storage, new values
    assert torch.equal(kept.generate(PROMPTS, config, seed=4).tokens, fresh.generate(PROMPTS, config, seed=4).tokens)
    assert kept._fast_sampler is sampler


def test_kept_decoder_is_rebuilt_when_what_it_captured_changes(tiny_janus):
    """New parameter storage, or PEFT adapters switched off, give a new decoder (a CUDA graph would otherwise replay
    the old weights or the old adapter state); without `keep_fast_decoder` nothing is kept."""
    peft = pytest.importorskip("peft")
    kept = _kept_backend(tiny_janus)
    config = GenerationConfig(guidance=3.0)
    kept.generate(PROMPTS[:1], config, seed=0)
    sampler = kept._fast_sampler
    head = kept.core.model.generation_head.vision_head
    head.weight = torch.nn.Parameter(head.weight.detach().clone())  # new storage
    kept.generate(PROMPTS[:1], config, seed=0)
    assert kept._fast_sampler is not sampler
    lora = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=r".*language_model.*\.q_proj")
    kept.model = peft.get_peft_model(kept.model, lora)
    kept.generate(PROMPTS[:1], config, seed=0)
    with_adapters = kept._fast_sampler
    with kept.frozen():
        kept.generate(PROMPTS[:1], config, seed=0)
        assert kept._fast_sampler is not with_adapters
    kept.keep_fast_decoder = False
    kept.generate(PROMPTS[:1], config, seed=0)
    assert kept._fast_sampler is None


@pytest.mark.gpu
def test_cuda_kept_decoder_replays_graphs_across_calls(tiny_janus):
    kept = _kept_backend(tiny_janus, "cuda")
    fresh = JanusBackend(kept.model, kept.processor, decode_path="fast")
    config = GenerationConfig(guidance=3.0, temperature=1.3)
    kept.generate(PROMPTS, config, seed=0)
    captures = kept._fast_sampler.decoder.graphs.captures
    assert captures > 0
    for seed in (0, 3):
        assert torch.equal(kept.generate(PROMPTS, config, seed=seed).tokens, fresh.generate(PROMPTS, config, seed).tokens)
    assert kept._fast_sampler.decoder.graphs.captures == captures  # replayed, not captured again


# ------------------------------------------------------------------------------------- compiled step pieces (CPU)
@pytest.fixture
def dynamo_reset():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_step_draws_the_reference_tokens_and_compiles_once_for_all_layers(dynamo_reset):
    """`compile=...` runs the step pieces through torch.compile (here the "aot_eager" backend: tracing and
    functionalisation without a C++ compiler). Host sampling still draws the reference's tokens; the piece between
    two attentions is traced once and reused by every layer pair (3 layers here), so a call compiles 3 graphs."""
    from torch._dynamo.utils import counters

    from srum_trl.models.janus import TinyJanusSpec, build_tiny_janus
    from tests.conftest import WORDS

    torch.manual_seed(0)
    model, processor = build_tiny_janus(WORDS, TinyJanusSpec(num_layers=3), seed=0)
    backend = JanusBackend(_sharpen(model), processor)
    options = {"backend": "aot_eager", "fullgraph": True}
    counters.clear()
    for config in (GenerationConfig(guidance=3.0, temperature=0.7), GenerationConfig(guidance=1.0, top_k=5)):
        ref = _reference(backend, PROMPTS, config, 3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = _fast(backend, PROMPTS, config, 3, sampling="host", compile=options)
        # no fallback to the uncompiled pieces, nor any other warning of ours; a library's deprecation notice
        # (a name it renamed) is not this test's business
        ours = [w for w in caught if not issubclass(w.category, (DeprecationWarning, FutureWarning))]
        assert not ours, [str(w.message) for w in ours]
        _assert_same(ref, got, guided=config.guidance != 1.0)
        if config.guidance != 1.0:
            assert counters["stats"]["unique_graphs"] == 3  # first, between (all layer pairs), last
    counters.clear()
    device_sampler = FastJanusSampler(backend, sampling="device", compile=options)
    config = GenerationConfig(guidance=3.0, temperature=0.7)
    compiled = device_sampler(PROMPTS, config, torch.Generator().manual_seed(2))
    assert counters["stats"]["unique_graphs"] == 1  # the sampling piece; the step pieces are already compiled
    eager = _fast(backend, PROMPTS, config, 2, sampling="device", compile=False)
    _assert_same(eager, compiled, guided=True)


def test_backend_passes_compile_decode(tiny_janus, dynamo_reset):
    model, processor = tiny_janus
    backend = JanusBackend(model.eval(), processor, decode_path="fast", keep_fast_decoder=True)
    assert backend.compile_decode == "auto"
    backend.generate(PROMPTS[:2], GenerationConfig(guidance=3.0), seed=0)
    assert backend._fast_sampler.decoder.compile is False  # "auto" on the CPU
    backend.compile_decode = {"backend": "aot_eager"}
    backend.generate(PROMPTS[:2], GenerationConfig(guidance=3.0), seed=0)
    assert backend._fast_sampler.decoder.compile == {"backend": "aot_eager"}  # a changed setting rebuilds it


def test_compile_failure_falls_back_with_a_warning(sharp_backend, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    pieces = {name: broken for name in fast_module._STEP_FUNCTIONS}
    monkeypatch.setattr(fast_module, "_step_functions", lambda compile: fast_module._STEP_FUNCTIONS if not compile
                        else pieces)
    config = GenerationConfig(guidance=3.0)
    with pytest.warns(UserWarning, match="continues without compiling"):
        got = _fast(sharp_backend, PROMPTS, config, 1, compile=True)
    _assert_same(_reference(sharp_backend, PROMPTS, config, 1), got, guided=True)
    with pytest.raises(ValueError, match="compile must be"):
        _fast(sharp_backend, PROMPTS, config, 1, compile="yes")


def test_fused_projections_draw_the_reference_tokens(sharp_backend):
    """`fuse_projections=True` runs q/k/v and gate/up as one matmul each over copies of the weights, also without
    adapters; the tokens stay the reference's. Without `merge_adapters` the layers run as they are."""
    config = GenerationConfig(guidance=3.0, temperature=0.7, top_k=5)
    sampler = FastJanusSampler(sharp_backend, fuse_projections=True)
    got = sampler(PROMPTS, config, torch.Generator().manual_seed(8))
    view, layer = sampler.decoder.step_layers[0], sampler.decoder.layers[0]
    assert view.self_attn.qkv_sizes == (layer.self_attn.q_proj.out_features,) * 3
    assert view.mlp.gate_up_proj.weight.shape[0] == 2 * layer.mlp.up_proj.out_features
    assert view.self_attn.o_proj is layer.self_attn.o_proj  # plain projections are not copied
    _assert_same(_reference(sharp_backend, PROMPTS, config, 8), got, guided=True)
    auto = FastJanusSampler(sharp_backend)  # "auto" without adapters: nothing to merge, nothing fused
    auto(PROMPTS, config, torch.Generator().manual_seed(8))
    assert auto.decoder.weights.parts == [] and auto.decoder.step_layers[0].self_attn.q_proj is layer.self_attn.q_proj
    unmerged = FastJanusSampler(sharp_backend, merge_adapters=False, fuse_projections=True)
    unmerged(PROMPTS, config, torch.Generator().manual_seed(8))
    assert unmerged.decoder.step_layers[0] is layer
    with pytest.raises(ValueError, match="fuse_projections must be"):
        FastJanusSampler(sharp_backend, fuse_projections="yes")(PROMPTS, config, torch.Generator())


def test_rejects_non_llama_layers(tiny_backend, monkeypatch):
    """The decode step runs Llama layers piece by piece; a layer without their parts is refused by name."""
    mlp = tiny_backend.core.model.language_model.layers[0].mlp
    monkeypatch.delattr(mlp, "gate_proj")
    with pytest.raises(ValueError, match=r"lacks \['mlp.gate_proj'\].*decode_path='reference'"):
        FastJanusDecoder(tiny_backend, batch=1, prompt_len=4, guided=False)

"""The native BAGEL backend on tiny configurations (CPU, offline): flow loss, sampler, understanding, the official
checkpoint layout, full-size parameter count on the meta device, LoRA targets and SRUMTrainer end to end."""

import json
import os

import pytest
import torch
from PIL import Image

from srum_trl.models import GenerationConfig, load_backend
from srum_trl.models.bagel import (
    BagelModel,
    bagel_7b_mot_config,
    build_bagel_model,
    guide_velocity,
    lora_targets,
    sampling_timesteps,
    set_trainable,
    tiny_bagel_backend,
)
from srum_trl.models.bagel.modeling import build_attention_mask, grid_position_ids
from srum_trl.models.bagel.processing import latents_to_tokens, navit_size, tokens_to_latents
from srum_trl.models.bagel.vae import build_vae, diffusers_to_ldm, ldm_to_diffusers, official_vae_keys

WORDS = "a red green blue circle square triangle and does this image show is there here describe".split()
PROMPTS = ["a red circle", "a blue square and a green triangle", "a green circle"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def bagel():
    return tiny_bagel_backend(WORDS, seed=0)


def _official_ema_shapes(config) -> dict[str, tuple]:
    """The tensors of the official `ema.safetensors`, enumerated by hand from the official code (`Bagel`,
    `Qwen2ForCausalLM` with `Qwen2MoTDecoderLayer` + `PackedAttentionMoT`, `SiglipVisionModel` after
    `convert_conv2d_to_linear` with one layer dropped, `MLPconnector`, `TimestepEmbedder`, `PositionEmbedding`)."""
    llm, vit = config.llm_config, config.vit_config
    D, V, I, d = llm.hidden_size, llm.vocab_size, llm.intermediate_size, llm.head_dim
    H, K = llm.num_attention_heads, llm.num_key_value_heads
    shapes = {"language_model.model.embed_tokens.weight": (V, D), "language_model.lm_head.weight": (V, D),
              "language_model.model.norm.weight": (D,), "language_model.model.norm_moe_gen.weight": (D,)}
    for i in range(llm.num_hidden_layers):
        p = f"language_model.model.layers.{i}."
        for s in ("", "_moe_gen"):
            shapes.update({
                f"{p}self_attn.q_proj{s}.weight": (H * d, D), f"{p}self_attn.q_proj{s}.bias": (H * d,),
                f"{p}self_attn.k_proj{s}.weight": (K * d, D), f"{p}self_attn.k_proj{s}.bias": (K * d,),
                f"{p}self_attn.v_proj{s}.weight": (K * d, D), f"{p}self_attn.v_proj{s}.bias": (K * d,),
                f"{p}self_attn.o_proj{s}.weight": (D, H * d),
                f"{p}self_attn.q_norm{s}.weight": (d,), f"{p}self_attn.k_norm{s}.weight": (d,),
                f"{p}mlp{s}.gate_proj.weight": (I, D), f"{p}mlp{s}.up_proj.weight": (I, D),
                f"{p}mlp{s}.down_proj.weight": (D, I),
                f"{p}input_layernorm{s}.weight": (D,), f"{p}post_attention_layernorm{s}.weight": (D,),
            })
    Dv, Iv, P = vit.hidden_size, vit.intermediate_size, vit.patch_size
    v = "vit_model.vision_model."
    shapes.update({f"{v}embeddings.patch_embedding.weight": (Dv, 3 * P * P),
                   f"{v}embeddings.patch_embedding.bias": (Dv,),
                   f"{v}embeddings.position_embedding.weight": ((vit.image_size // P) ** 2, Dv),
                   f"{v}post_layernorm.weight": (Dv,), f"{v}post_layernorm.bias": (Dv,)})
    for j in range(vit.num_hidden_layers - 1):
        p = f"{v}encoder.layers.{j}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{p}self_attn.{proj}.weight"], shapes[f"{p}self_attn.{proj}.bias"] = (Dv, Dv), (Dv,)
        for ln in ("layer_norm1", "layer_norm2"):
            shapes[f"{p}{ln}.weight"], shapes[f"{p}{ln}.bias"] = (Dv,), (Dv,)
        shapes.update({f"{p}mlp.fc1.weight": (Iv, Dv), f"{p}mlp.fc1.bias": (Iv,), f"{p}mlp.fc2.weight": (Dv, Iv),
                       f"{p}mlp.fc2.bias": (Dv,)})
    C = config.latent_patch_size**2 * config.vae["z_channels"]
    shapes.update({"connector.fc1.weight": (D, Dv), "connector.fc1.bias": (D,), "connector.fc2.weight": (D, D),
                   "connector.fc2.bias": (D,), "vit_pos_embed.pos_embed": (config.vit_max_num_patch_per_side**2, D),
                   "time_embedder.mlp.0.weight": (D, 256), "time_embedder.mlp.0.bias": (D,),
                   "time_embedder.mlp.2.weight": (D, D), "time_embedder.mlp.2.bias": (D,),
                   "vae2llm.weight": (D, C), "vae2llm.bias": (D,), "llm2vae.weight": (C, D), "llm2vae.bias": (C,),
                   "latent_pos_embed.pos_embed": (config.max_latent_size**2, D)})
    return shapes


def _write_official_folder(path, bagel, seed=0):
    """A synthetic checkpoint in the official file layout: llm_config.json / vit_config.json as the official folder
    writes them (no config.json), ema.safetensors and ae.safetensors with the official key names, tokenizer."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    config = bagel.config
    llm, vit = config.llm_config, config.vit_config
    llm_json = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": llm.hidden_size, "hidden_act": "silu",
                "intermediate_size": llm.intermediate_size, "num_hidden_layers": llm.num_hidden_layers,
                "num_attention_heads": llm.num_attention_heads, "num_key_value_heads": llm.num_key_value_heads,
                "max_position_embeddings": llm.max_position_embeddings, "rms_norm_eps": llm.rms_norm_eps,
                "rope_theta": llm.rope_theta, "vocab_size": llm.vocab_size, "model_type": "qwen2",
                "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_sliding_window": False}
    vit_json = {"hidden_size": vit.hidden_size, "image_size": vit.image_size, "patch_size": vit.patch_size,
                "intermediate_size": vit.intermediate_size, "model_type": "siglip_vision_model",
                "num_attention_heads": vit.num_attention_heads, "num_hidden_layers": vit.num_hidden_layers}
    with open(os.path.join(path, "llm_config.json"), "w") as f:
        json.dump(llm_json, f)
    with open(os.path.join(path, "vit_config.json"), "w") as f:
        json.dump(vit_json, f)
    g = torch.Generator().manual_seed(seed)
    ema = {k: (torch.randn(s, generator=g) * 0.05).to(torch.bfloat16) for k, s in _official_ema_shapes(config).items()}
    save_file(ema, os.path.join(path, "ema.safetensors"))
    save_file(diffusers_to_ldm(bagel.vae.state_dict(), config.vae_config), os.path.join(path, "ae.safetensors"))
    bagel.tokenizer.save_pretrained(path)
    # the official Hub folder ships a config.json that is not a model config (not even valid JSON)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write('{\n  "name": [\n    "BAGEL-7B-MoT"\n  ],\n}')
    return ema


# ------------------------------------------------------------------------------------------------ checkpoint


def test_official_layout_loads_strictly(bagel, tmp_path):
    ema = _write_official_folder(str(tmp_path / "bagel"), bagel)
    loaded = load_backend(str(tmp_path / "bagel"), image_size=64, num_timesteps=3, vit_max_size=56, vit_min_size=28,
                          max_latent_size=8, vit_max_num_patch_per_side=4)
    assert type(loaded).__name__ == "BagelBackend" and loaded.token_kind == "continuous"
    state = loaded.core.state_dict()
    assert set(state) == set(ema)
    assert all(torch.equal(state[k], ema[k]) for k in ema)
    assert loaded.core.load_report["recomputed"] == [] and loaded.core.dtype == torch.bfloat16
    assert not loaded.core.latent_pos_embed.pos_embed.requires_grad
    for k, v in loaded.vae.state_dict().items():  # the VAE went through the ldm -> diffusers conversion
        assert torch.equal(v, bagel.vae.state_dict()[k]), k
    rollout = loaded.generate(["a red circle"], GenerationConfig(guidance=4.0), seed=0)
    assert rollout.tokens.shape == (1, 16, 8, 8) and rollout.images[0].size == (64, 64)
    # a missing tensor or a renamed one is refused
    from safetensors.torch import save_file

    broken = dict(ema)
    broken["language_model.model.layers.0.self_attn.q_proj_gen.weight"] = broken.pop(
        "language_model.model.layers.0.self_attn.q_proj_moe_gen.weight")
    save_file(broken, str(tmp_path / "bagel" / "ema.safetensors"))
    with pytest.raises(ValueError, match="1 missing.*1 unexpected"):
        load_backend(str(tmp_path / "bagel"), max_latent_size=8, vit_max_num_patch_per_side=4)


def test_save_pretrained_roundtrip(bagel, tmp_path):
    bagel.save_pretrained(str(tmp_path / "saved"))
    names = set(os.listdir(tmp_path / "saved"))
    assert {"llm_config.json", "vit_config.json", "ema.safetensors", "ae.safetensors", "config.json"} <= names
    loaded = load_backend(str(tmp_path / "saved"), dtype="float32", image_size=64, num_timesteps=4,
                          vit_max_size=56, vit_min_size=28)
    config = GenerationConfig(guidance=3.0, batch_size=2)
    torch.testing.assert_close(loaded.generate(PROMPTS, config, seed=5).tokens,
                               bagel.generate(PROMPTS, config, seed=5).tokens)


def test_vae_key_conversion_matches_diffusers():
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    torch.manual_seed(0)
    from srum_trl.models.bagel import BagelVAEConfig

    cfg = BagelVAEConfig(ch=32, ch_mult=[1, 2, 2, 2], num_res_blocks=1)
    vae = build_vae(cfg)
    ldm = diffusers_to_ldm(vae.state_dict(), cfg)
    assert set(ldm) == set(official_vae_keys(cfg))
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    ours = ldm_to_diffusers(ldm, cfg)
    theirs = convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    assert set(ours) == set(theirs) == set(vae.state_dict())
    assert all(torch.equal(ours[k], theirs[k].reshape(ours[k].shape)) for k in ours)


def test_full_size_on_meta_device():
    config = bagel_7b_mot_config()
    model = build_bagel_model(config, device="meta")
    parts = model.num_parameters_by_part()
    assert 14.0e9 < parts["total"] < 15.0e9, parts
    assert 6.0e9 < parts["llm_generation"] < 7.0e9  # the generation expert: the ~7B trained by SRUM
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == _official_ema_shapes(config)
    assert all(p.device.type == "meta" for p in model.parameters())


# ---------------------------------------------------------------------------------------------------- model


def test_cached_context_equals_one_packed_sequence(bagel):
    """The KV-cache path (text, then the image block attending to it) equals one packed sequence with the official
    training mask (causal text, full image block), for left-padded rows of different lengths."""
    core = bagel.core
    rows = [bagel._prompt_ids(p) for p in PROMPTS]
    ids, valid = bagel._left_pad(rows)
    grid, n = (4, 4), 16
    torch.manual_seed(0)
    x_t, t = torch.randn(3, n, 64), torch.rand(3)
    markers = bagel._markers()
    with torch.no_grad():
        v_cached = core(task="context_velocity", ids=ids, valid=valid, x_t=x_t, t=t, grid=grid, markers=markers)
        h_text = core.lm.embed_tokens(ids)
        ends = core.lm.embed_tokens(markers)
        block = torch.cat([ends[None, :1].expand(3, 1, -1), core.latent_token_embeddings(x_t, t, grid),
                           ends[None, 1:].expand(3, 1, -1)], 1)
        h = torch.cat([h_text, block], 1)
        L = ids.shape[1]
        text_pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
        positions = torch.cat([text_pos, valid.long().sum(-1, keepdim=True).expand(3, n + 2)], 1)
        full_valid = torch.cat([valid, torch.ones(3, n + 2, dtype=torch.bool)], 1)
        block_id = torch.cat([torch.full_like(ids, -1), torch.zeros(3, n + 2, dtype=torch.long)], 1)
        hidden, _ = core.lm(h, positions, build_attention_mask(full_valid, block_id), (L + 1, L + 1 + n))
        v_packed = core.llm2vae(hidden[:, L + 1 : L + 1 + n])
        # each row alone (no padding) gives the same velocity
        for i in range(3):
            ids_i, valid_i = bagel._left_pad([rows[i]])
            v_i = core(task="context_velocity", ids=ids_i, valid=valid_i, x_t=x_t[i : i + 1], t=t[i : i + 1],
                       grid=grid, markers=markers)
            torch.testing.assert_close(v_i[0], v_cached[i], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(v_cached, v_packed, atol=1e-5, rtol=1e-4)


def test_mot_routing_uses_generation_weights_only_for_latents(bagel):
    core = bagel.core
    ids, valid = bagel._left_pad([bagel._prompt_ids("a red circle")])
    x_t, t = torch.randn(1, 16, 64), torch.rand(1)
    with torch.no_grad():
        before = core(task="context_velocity", ids=ids, valid=valid, x_t=x_t, t=t, grid=(4, 4),
                      markers=bagel._markers())
        cache_before = core(task="context", ids=ids, valid=valid)
        core.language_model.model.layers[0].mlp_moe_gen.down_proj.weight.mul_(3.0)
        after = core(task="context_velocity", ids=ids, valid=valid, x_t=x_t, t=t, grid=(4, 4),
                     markers=bagel._markers())
        cache_after = core(task="context", ids=ids, valid=valid)
    assert not torch.allclose(before, after)
    for (k0, v0), (k1, v1) in zip(cache_before, cache_after):  # text goes through the understanding expert only
        assert torch.equal(k0, k1) and torch.equal(v0, v1)


def test_sampler_shapes_determinism_and_guidance(bagel):
    config = GenerationConfig(guidance=4.0, batch_size=2)
    r1 = bagel.generate(PROMPTS, config, seed=7)
    r2 = bagel.generate(PROMPTS, config, seed=7)
    r3 = bagel.generate(PROMPTS, config, seed=8)
    r4 = bagel.generate(PROMPTS, GenerationConfig(guidance=1.0, batch_size=2), seed=7)
    assert r1.tokens.shape == (3, 16, 8, 8) and r1.grid == (4, 4) and r1.tokens.dtype == torch.float32
    assert [im.size for im in r1.images] == [(64, 64)] * 3
    assert torch.equal(r1.tokens, r2.tokens)
    assert not torch.allclose(r1.tokens, r3.tokens) and not torch.allclose(r1.tokens, r4.tokens)
    # batch size does not change the samples (noise is drawn per image in order)
    r5 = bagel.generate(PROMPTS, GenerationConfig(guidance=4.0, batch_size=3), seed=7)
    torch.testing.assert_close(r5.tokens, r1.tokens, atol=1e-4, rtol=1e-4)
    assert len(bagel.decode(r1.tokens[:1])) == 1


def test_sampler_schedule_and_renorm():
    ts = sampling_timesteps(50, 3.0)
    assert ts[0] == 1.0 and ts[-1] == 0.0 and ts.shape == (50,)
    assert float(ts[25]) == pytest.approx(3 * (1 - 25 / 49) / (1 + 2 * (1 - 25 / 49)), rel=1e-6)
    vc, vu = torch.randn(2, 16, 64), torch.randn(2, 16, 64)
    g = guide_velocity(vc, vu, 4.0, "global")
    raw = vu + 4.0 * (vc - vu)
    for i in range(2):  # per image: scaled down to the conditional norm (never up)
        scale = min(1.0, float(vc[i].norm() / raw[i].norm()))
        torch.testing.assert_close(g[i], raw[i] * scale)
    torch.testing.assert_close(guide_velocity(vc, vu, 4.0, "none"), raw)


def test_token_losses_flow_matching(bagel):
    rollout = bagel.generate(PROMPTS[:2], GenerationConfig(guidance=4.0), seed=1)
    torch.manual_seed(3)
    cond = bagel.token_losses(PROMPTS[:2], rollout, "conditional")
    torch.manual_seed(3)
    again = bagel.token_losses(PROMPTS[:2], rollout, "conditional")
    assert cond.shape == (2, 16) and torch.equal(cond, again)  # seeded through torch's RNG
    # by hand: the same t and noise, the velocity target eps - x0
    torch.manual_seed(3)
    t = torch.sigmoid(torch.randn(2))
    x0 = latents_to_tokens(rollout.tokens)
    eps = torch.randn_like(x0)
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
    ids, valid = bagel._left_pad([bagel._prompt_ids(p) for p in PROMPTS[:2]])
    v = bagel.core(task="context_velocity", ids=ids, valid=valid, x_t=x_t, t=t, grid=(4, 4), markers=bagel._markers())
    torch.testing.assert_close(cond, (v - (eps - x0)).pow(2).mean(-1), atol=1e-5, rtol=1e-5)
    # "guided", by hand: the CFG velocity u + w (c - u) renormalised per image to the conditional norm (never up),
    # used where t lies in the CFG interval, the conditional velocity elsewhere (an interval splitting the two t)
    low = float(t.min() + t.max()) / 2
    bagel.cfg_interval = (low, 1.0)
    torch.manual_seed(3)
    guided = bagel.token_losses(PROMPTS[:2], rollout, "guided")
    empty, empty_valid = bagel._left_pad([[], []])
    v_u = bagel.core(task="context_velocity", ids=empty, valid=empty_valid, x_t=x_t, t=t, grid=(4, 4),
                     markers=bagel._markers())
    raw = v_u + rollout.guidance * (v - v_u)
    scale = (v.flatten(1).norm(dim=1) / raw.flatten(1).norm(dim=1)).clamp(max=1.0)
    inside = t > low
    by_hand = torch.where(inside[:, None, None], raw * scale[:, None, None], v)
    assert inside.tolist() in ([True, False], [False, True]) and rollout.guidance == 4.0
    torch.testing.assert_close(guided, (by_hand - (eps - x0)).pow(2).mean(-1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(guided, cond)  # the guided image's loss is not the conditional one
    # the weighted SRUM loss backpropagates into both experts (the prompt is encoded by the understanding one)
    weights = torch.rand(2, 16)
    ((weights + 0.5) * bagel.token_losses(PROMPTS[:2], rollout, "conditional", text_dropout=0.0)).mean().backward()
    layer = bagel.core.language_model.model.layers[0]
    assert layer.mlp_moe_gen.down_proj.weight.grad.abs().sum() > 0
    assert layer.self_attn.k_proj.weight.grad.abs().sum() > 0
    assert bagel.core.vit_model.vision_model.post_layernorm.weight.grad is None
    with pytest.raises(ValueError, match="loss_guidance"):
        bagel.token_losses(PROMPTS[:2], rollout, "both")


def test_text_dropout_trains_the_unconditional_velocity(bagel):
    rollout = bagel.generate(PROMPTS[:2], GenerationConfig(guidance=4.0), seed=1)
    torch.manual_seed(0)
    dropped = bagel.token_losses(PROMPTS[:2], rollout, "conditional", text_dropout=0.999)
    torch.manual_seed(0)
    empty = bagel.token_losses(["x", "x"], rollout, "conditional")  # same RNG draws, different prompt
    torch.manual_seed(0)
    t = torch.sigmoid(torch.randn(2))
    x0 = latents_to_tokens(rollout.tokens)
    eps = torch.randn_like(x0)
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
    ids, valid = bagel._left_pad([[], []])
    with torch.no_grad():
        v = bagel.core(task="context_velocity", ids=ids, valid=valid, x_t=x_t, t=t, grid=(4, 4),
                       markers=bagel._markers())
    torch.testing.assert_close(dropped.detach(), (v - (eps - x0)).pow(2).mean(-1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(dropped, empty)


def test_gradient_checkpointing_gives_the_same_gradients(bagel):
    rollout = bagel.generate(PROMPTS[:2], GenerationConfig(guidance=4.0), seed=2)
    bagel.model.train()

    def grads():
        bagel.model.zero_grad()
        torch.manual_seed(0)
        bagel.token_losses(PROMPTS[:2], rollout, "conditional").mean().backward()
        return bagel.core.language_model.model.layers[1].self_attn.q_proj_moe_gen.weight.grad.clone()

    plain = grads()
    bagel.core.gradient_checkpointing_enable()
    assert bagel.core.language_model.model.gradient_checkpointing
    torch.testing.assert_close(grads(), plain)


# ------------------------------------------------------------------------------------------- understanding


def test_understanding_logits_and_judge(bagel):
    images = [Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (40, 70), (0, 0, 255))]
    questions = ["is there a red circle here", "does this image show a blue square"]
    logits = bagel.understanding_logits(images, questions)
    assert logits.shape == (2, bagel.config.llm_config.vocab_size)
    for i in range(2):  # padding (text and ViT patches) does not leak
        torch.testing.assert_close(bagel.understanding_logits(images[i : i + 1], questions[i : i + 1])[0], logits[i],
                                   atol=1e-5, rtol=1e-4)
    p = bagel.yes_probability(images, questions)
    tok = bagel.tokenizer
    yes = [tok.convert_tokens_to_ids(w) for w in ("Yes", "yes")]
    no = [tok.convert_tokens_to_ids(w) for w in ("No", "no")]
    manual = torch.sigmoid(torch.logsumexp(logits[:, yes], -1) - torch.logsumexp(logits[:, no], -1))
    torch.testing.assert_close(p, manual)
    answers = bagel.answer(images, questions, max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    # greedy decoding with the cache continues exactly the prefill's argmax
    first = bagel.answer(images[:1], questions[:1], max_new_tokens=1)[0]
    assert first == bagel.tokenizer.decode([int(logits[0].argmax())], skip_special_tokens=True)


def test_navit_resize_rule():
    assert navit_size(1024, 1024, 980, 224, 14) == (980, 980)
    assert navit_size(100, 50, 980, 224, 14) == (448, 224)
    w, h = navit_size(3000, 1000, 980, 224, 14, 14 * 14 * 9 * 1024)
    assert w <= 980 and w % 14 == 0 and h % 14 == 0
    assert grid_position_ids(2, 3, 70).tolist() == [0, 1, 2, 70, 71, 72]
    lat = torch.randn(2, 16, 8, 6)
    assert torch.equal(tokens_to_latents(latents_to_tokens(lat), (4, 3), 16), lat)
    assert latents_to_tokens(lat).shape == (2, 12, 64)


# -------------------------------------------------------------------------------------------------- training


def test_lora_target_sets(bagel):
    from peft import LoraConfig, get_peft_model

    names = [n for n, _ in bagel.core.named_modules()]
    import re

    gen = [n for n in names if re.fullmatch(lora_targets("gen"), n)]
    und = [n for n in names if re.fullmatch(lora_targets("und"), n)]
    both = [n for n in names if re.fullmatch(lora_targets("both"), n)]
    assert len(gen) == len(und) == 7 * 2 and sorted(both) == sorted(gen + und)
    assert all("_moe_gen" in n for n in gen) and not any("_moe_gen" in n for n in und)
    assert bagel.default_lora_targets() == lora_targets("gen")
    model = get_peft_model(bagel.model, LoraConfig(r=2, target_modules=lora_targets("gen"), task_type="CAUSAL_LM"))
    bagel.model = model
    rollout = bagel.generate(PROMPTS[:1], GenerationConfig(guidance=4.0), seed=0)
    assert rollout.tokens.shape == (1, 16, 8, 8)
    images = [Image.new("RGB", (64, 64), (0, 255, 0))]
    with bagel.frozen():
        frozen_p = bagel.yes_probability(images, ["a"])
    assert torch.equal(frozen_p, bagel.yes_probability(images, ["a"]))  # generation LoRA leaves the judge alone
    with pytest.raises(ValueError, match="which"):
        lora_targets("vit")


def test_set_trainable_sets(bagel):
    counts = set_trainable(bagel.core, "gen")
    trainable = {n for n, p in bagel.core.named_parameters() if p.requires_grad}
    assert trainable and all("_moe_gen" in n or n.split(".")[0] in ("vae2llm", "llm2vae", "time_embedder")
                             for n in trainable)
    set_trainable(bagel.core, "llm")
    rollout = bagel.generate(PROMPTS[:2], GenerationConfig(guidance=4.0), seed=0)
    bagel.token_losses(PROMPTS[:2], rollout, "conditional").sum().backward()
    for name, p in bagel.core.named_parameters():  # exactly the trainable parameters get gradients
        assert (p.grad is not None) == p.requires_grad, name
    assert counts["trainable"] > 0


def test_srum_trainer_lora_end_to_end(bagel, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig

    from srum_trl import SRUMConfig, SRUMTrainer

    args = SRUMConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=2, logging_steps=1,
                      bf16=False, report_to=[], warmup_steps=0, learning_rate=1e-2, guidance_scale=4.0,
                      save_strategy="no", seed=0, dataloader_num_workers=0, loss_guidance="conditional",
                      use_cpu=True)
    trainer = SRUMTrainer(bagel, args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS + PROMPTS[:1]}),
                          peft_config=LoraConfig(r=2, lora_alpha=4))
    trainer.train()
    logs = trainer.state.log_history[0]
    assert {"loss", "reward", "srum/token_loss", "srum/token_weight"} <= set(logs)
    trained = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n and "_moe_gen" in n for n in trained)
    trainer.save_model(str(tmp_path / "adapter"))
    assert os.path.exists(tmp_path / "adapter" / "adapter_model.safetensors")


def test_weighted_loss_of_the_trainer(bagel, tmp_path):
    from datasets import Dataset

    from srum_trl import SRUMConfig, SRUMTrainer

    args = SRUMConfig(output_dir=str(tmp_path / "o"), report_to=[], bf16=False, use_cpu=True, constraint_weight=0.5, per_device_train_batch_size=2,
                      loss_guidance="conditional", text_dropout=0.0)
    trainer = SRUMTrainer(bagel, args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS}))
    rollout = bagel.generate(PROMPTS[:2], GenerationConfig(guidance=4.0), seed=0)
    weights = torch.rand(2, 16) * 2 - 1
    loss = trainer.compute_loss(trainer.model, {"rollout": rollout, "weights": weights})
    # the trainer draws the timesteps and noise from its per-process, per-micro-step generator
    per_token = bagel.token_losses(rollout.prompts, rollout, "conditional", generator=trainer._generator("loss"))
    torch.testing.assert_close(loss, ((weights + 0.5) * per_token).mean())


def test_bad_settings(bagel):
    with pytest.raises(ValueError, match="image_size"):
        tiny_bagel_backend(WORDS, image_size=72)
    with pytest.raises(ValueError, match="num_timesteps"):
        tiny_bagel_backend(WORDS, num_timesteps=1)
    with pytest.raises(ValueError, match="prompt\\[0\\] is empty"):
        bagel.generate([" "])
    with pytest.raises(ValueError, match="unknown task"):
        bagel.core(task="nope")
    assert isinstance(bagel.core, BagelModel) and bagel.max_prompt_tokens == 511
    assert bagel.prompt_lengths(["a red circle"]) == [5]

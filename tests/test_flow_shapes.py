"""The ShapesWorld flow base (a tiny BAGEL) on the CPU: its configuration, the pretraining command at smoke scale,
BAGEL's file layout and strict reloading, seeded generation, judging, a training step, the CLI, and the training
batches against the backend's own inputs."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from srum_trl.cli import main as cli
from srum_trl.models import GenerationConfig, load_backend
from srum_trl.models.bagel import BagelModel, bagel_7b_mot_config
from srum_trl.models.bagel.config import VAE_CONFIG_FILE, BagelConfig
from srum_trl.shapes import render
from srum_trl.shapes.flow_pretrain import SCALES, FlowSpec, flow_bagel_config

PROMPTS = ["a red circle", "a blue square to the left of a green triangle", "three yellow circles"]
LAYOUT = {"llm_config.json", "vit_config.json", "ema.safetensors", "ae.safetensors", "ae_config.json",
          "tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json", "metrics.json"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """The pretraining command at smoke scale: (output folder, returned metrics)."""
    from srum_trl.shapes import flow_pretrain

    out = tmp_path_factory.mktemp("flow_pretrain")
    metrics = flow_pretrain.main(["--out", str(out), "--scale", "tiny", "--device", "cpu", "--time-budget-s", "25"])
    return out, metrics


@pytest.fixture(scope="module")
def flow(pretrained):
    return load_backend(str(pretrained[0] / "model"), dtype="float32")


def test_full_spec_sizes_and_grid():
    """8x8 generation tokens per 64 px image, from the configuration (VAE /4, 2x2 latent patches); <= 9 MiB."""
    config = flow_bagel_config(FlowSpec(), vocab_size=48)
    assert config.vae_config.downsample == 4 and config.latent_patch_size == 2 and config.latent_downsample == 8
    assert config.max_latent_size == 8 and config.patch_latent_dim == 2 * 2 * 4
    assert config.vit_max_num_patch_per_side == 64 // 8 == config.vit_config.image_size // config.vit_config.patch_size
    with torch.device("meta"):
        model = BagelModel(config)
        from srum_trl.models.bagel.vae import build_vae

        vae = build_vae(config.vae_config)
    n = sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in vae.parameters())
    assert 2 * n <= 9 * 2**20  # bfloat16
    # the generation expert mirrors the understanding one, layer by layer
    names = {k for k, _ in model.named_parameters()}
    assert "language_model.model.layers.3.mlp_moe_gen.down_proj.weight" in names
    assert "language_model.model.layers.3.self_attn.q_norm_moe_gen.weight" in names


def test_pretraining_smoke_writes_bagel_layout(pretrained):
    out, metrics = pretrained
    model_dir = out / "model"
    assert LAYOUT <= set(os.listdir(model_dir))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["generation_accuracy"] == metrics["generation_accuracy"]
    for key in ("vae_recon_accuracy", "understanding_accuracy", "generation_accuracy", "judge_agreement_accuracy",
                "generation_accuracy_train_prompts"):
        assert 0.0 <= saved[key] <= 1.0, key
    assert set(saved["generation"]) == set(saved["generation_train_prompts"]) == {"cfg 1, shift 1", "cfg 3, shift 1"}
    assert saved["token_grid"] == [8, 8] and saved["steps"]["vae"] >= 1 and saved["steps"]["lm"] >= 1
    assert saved["folder_bytes"] == sum(f.stat().st_size for f in model_dir.iterdir() if f.name != "metrics.json")
    settings = json.loads((model_dir / "generation_config.json").read_text())
    assert settings["guidance_scale"] == saved["best_guidance"] and settings["image_size"] == 64
    vae = json.loads((model_dir / VAE_CONFIG_FILE).read_text())
    assert vae["ch_mult"] == [1, 1, 1] and vae["z_channels"] == 4 and vae["scale_factor"] > 0


def test_reload_is_strict_and_exact(pretrained, flow, tmp_path):
    from safetensors.torch import load_file, save_file

    model_dir = pretrained[0] / "model"
    stored = load_file(str(model_dir / "ema.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in stored.values())
    state = flow.core.state_dict()
    assert set(state) == set(stored)
    assert all(torch.equal(state[k].to(torch.bfloat16), stored[k]) for k in stored)
    assert flow.token_grid == (8, 8) and flow.image_size == 64 and flow.vit_max_size == 64
    vae = json.loads((model_dir / VAE_CONFIG_FILE).read_text())
    assert flow.vae.config.scaling_factor == pytest.approx(vae["scale_factor"])
    assert flow.vae.config.shift_factor == pytest.approx(vae["shift_factor"])
    assert flow.default_generation_config().guidance == json.loads(
        (model_dir / "generation_config.json").read_text())["guidance_scale"]
    # saved again, it loads again to the same weights (the non-FLUX VAE keeps its file)
    flow.save_pretrained(str(tmp_path / "again"))
    assert VAE_CONFIG_FILE in os.listdir(tmp_path / "again")
    again = load_backend(str(tmp_path / "again"), dtype="float32")
    for k, v in again.vae.state_dict().items():
        assert torch.equal(v, flow.vae.state_dict()[k]), k
    # a renamed tensor is refused
    broken = dict(stored)
    broken["llm2vae.weight_x"] = broken.pop("llm2vae.weight")
    save_file(broken, str(tmp_path / "again" / "ema.safetensors"))
    with pytest.raises(ValueError, match="1 missing.*1 unexpected"):
        load_backend(str(tmp_path / "again"))


def test_official_flux_folder_needs_no_vae_file(tmp_path):
    bagel_7b_mot_config().save_folder(str(tmp_path))
    assert VAE_CONFIG_FILE not in os.listdir(tmp_path)
    config = BagelConfig.from_folder(str(tmp_path))
    assert config.vae_config.scale_factor == 0.3611 and config.latent_downsample == 16


def test_bad_generation_config_is_named(pretrained, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(pretrained[0] / "model", folder)
    (folder / "generation_config.json").write_text(json.dumps({"guidance": 3.0}))
    with pytest.raises(ValueError, match="unknown settings \\['guidance'\\]"):
        load_backend(str(folder))


def test_seeded_generation_and_judge(flow):
    config = GenerationConfig(guidance=2.0, batch_size=2)
    a = flow.generate(PROMPTS, config, seed=3)
    b = flow.generate(PROMPTS, config, seed=3)
    c = flow.generate(PROMPTS, config, seed=4)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    assert a.tokens.shape == (3, 4, 16, 16) and a.grid == (8, 8)
    assert [(im.size, im.mode) for im in a.images] == [((64, 64), "RGB")] * 3
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, b.images))
    gap = flow.guidance_margin(a.prompts, a)
    assert gap.shape == (3,) and bool((gap >= 0).all())
    from srum_trl.shapes.questions import make_shapes_judge

    judge = make_shapes_judge(flow)
    maps = judge.judge(a.images, a.prompts, a.grid)
    assert len(maps) == 3 and all(m.token_map.shape == (8, 8) for m in maps)
    assert all(-1.0 <= m.global_score <= 1.0 for m in maps)


def test_training_step_changes_the_adapter(pretrained, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig

    from srum_trl import SRUMConfig, SRUMTrainer
    from srum_trl.shapes.questions import make_shapes_judge

    flow = load_backend(str(pretrained[0] / "model"), dtype="float32")
    args = SRUMConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=1, bf16=False,
                      report_to=[], warmup_steps=0, learning_rate=1e-2, guidance_scale=2.0, save_strategy="no",
                      seed=0, loss_guidance="conditional", use_cpu=True, num_generations=2,
                      reward_baseline="prompt", constraint_weight=0.0)
    trainer = SRUMTrainer(flow, reward_funcs=[make_shapes_judge(use_local=False)], args=args,
                          train_dataset=Dataset.from_dict({"prompt": PROMPTS + ["two red squares"]}),
                          peft_config=LoraConfig(r=4, lora_alpha=8))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert before and any(not torch.equal(before[n], after[n].detach()) for n in before)
    assert all("_moe_gen" in n for n in before)  # the generation expert: the judge's path is unchanged
    trainer.save_model(str(tmp_path / "adapter"))
    tuned = load_backend(str(pretrained[0] / "model"), adapter=str(tmp_path / "adapter"), dtype="float32")
    plain = load_backend(str(pretrained[0] / "model"), dtype="float32")
    config = GenerationConfig(guidance=2.0)
    assert not torch.equal(tuned.generate(PROMPTS[:1], config, seed=0).tokens,
                           plain.generate(PROMPTS[:1], config, seed=0).tokens)


def test_cli_generate_and_score(pretrained, tmp_path, capsys):
    model_dir = str(pretrained[0] / "model")
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "images"
    cli(["generate", "--model", model_dir, "--prompts", str(prompts), "--out", str(out), "--seed", "0"])
    files = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    assert files == ["00000.png", "00001.png", "00002.png"] and os.path.exists(out / "images.json")
    assert all(Image.open(out / f).size == (64, 64) and Image.open(out / f).mode == "RGB" for f in files)
    # without flags, the folder's own sampler settings: the same images as its default generation config
    backend = load_backend(model_dir, dtype="float32")
    expected = backend.generate(PROMPTS, GenerationConfig(guidance=backend.default_generation_config().guidance),
                                seed=0)
    assert np.array_equal(np.asarray(Image.open(out / "00001.png")), np.asarray(expected.images[1]))
    cli(["shapes", "eval", "--images", str(out), "--prompts", str(prompts)])
    result = json.load(open(out / "shapes_eval.json"))
    assert result["num_images"] == 3 and 0.0 <= result["accuracy"]["overall"] <= 1.0
    assert "overall" in capsys.readouterr().out


def test_understanding_batches_equal_the_backend(flow):
    """The pretraining's on-device understanding rows give the judge's own P(yes) (whole images and crops)."""
    from srum_trl.shapes.flow_batches import FlowTextTables, NavitCanvas, understanding_inputs
    from srum_trl.shapes.questions import global_question, local_question
    from srum_trl.shapes.world import train_prompts

    rng = np.random.default_rng(0)
    prompts = train_prompts()
    tables = FlowTextTables(flow.tokenizer, prompts, "cpu")
    canvas = NavitCanvas(64, flow.vit_max_size, flow.vit_min_size, flow.config.vit_config.patch_size, "cpu")
    image, objects = render(prompts[5], rng)
    boxes = [(0, 0, 64, 64)] + [tuple(o.box) for o in objects] + [(3, 10, 40, 29), (50, 2, 63, 41)]
    questions = [global_question(prompts[5])] + [local_question(o.color, o.shape) for o in objects] * 3
    questions = questions[: len(boxes)]
    rows = torch.tensor([tables.global_row(torch.tensor(5), torch.tensor(1))] +
                        [tables.local_row(torch.tensor(tables.local_questions.index(q)), torch.tensor(1))
                         for q in questions[1:]])
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None].expand(len(boxes), 3, 64, 64)
    patches, vit_valid = canvas.patches(pixels, torch.tensor(boxes))
    inputs = understanding_inputs(tables, rows, patches, vit_valid, canvas.position_ids)
    labels, answer_index = inputs.pop("labels"), inputs.pop("answer_index")
    with torch.no_grad():
        logits = flow.core(task="understand", all_logits=True, **inputs)
    mine = logits[torch.arange(len(boxes)), answer_index]
    ref = flow.understanding_logits([image.crop(b) for b in boxes], questions)
    assert torch.equal(labels[torch.arange(len(boxes)), answer_index + 1], torch.full((len(boxes),), tables.yes_id))
    torch.testing.assert_close(mine, ref, atol=2e-3, rtol=0)  # crops: Pillow's fixed-point bicubic vs float


def test_dropped_prompt_is_the_unconditional_context(flow):
    """A generation row whose tokens are all masked (a dropped prompt) gives the sampler's unconditional velocity."""
    from srum_trl.shapes.flow_batches import FlowTextTables

    tables = FlowTextTables(flow.tokenizer, PROMPTS, "cpu")
    x_t, t = torch.randn(2, 64, 16), torch.tensor([0.3, 0.8])
    markers = torch.tensor([tables.ids.start_of_image, tables.ids.end_of_image])
    with torch.no_grad():
        dropped = flow.core(task="context_velocity", ids=tables.gen_ids[:2], valid=torch.zeros_like(tables.gen_valid[:2]),
                            x_t=x_t, t=t, grid=(8, 8), markers=markers)
        ids, valid = flow._left_pad([[], []])
        empty = flow.core(task="context_velocity", ids=ids, valid=valid, x_t=x_t, t=t, grid=(8, 8), markers=markers)
        ids, valid = flow._left_pad([flow._prompt_ids(p) for p in PROMPTS[:2]])
        cond = flow.core(task="context_velocity", ids=ids, valid=valid, x_t=x_t, t=t, grid=(8, 8), markers=markers)
    torch.testing.assert_close(dropped, empty, atol=1e-5, rtol=0)
    torch.testing.assert_close(tables.gen_ids[:2][tables.gen_valid[:2]], ids[valid])  # the backend's prompt rows
    assert not torch.allclose(cond, empty, atol=1e-4)


def test_tiny_scale_is_the_smoke_scale():
    assert SCALES["tiny"].workers == 0 and SCALES["full"].time_budget_s <= 8 * 60


def test_place_tokens_is_masked_scatter():
    """The sync-free placement of ViT tokens equals `masked_scatter` of the valid tokens, values and gradients."""
    from srum_trl.models.bagel.modeling import place_tokens

    g = torch.Generator().manual_seed(0)
    valid = torch.rand(3, 5, generator=g) < 0.6
    valid[1] = False  # an image with no valid token
    count = int(valid.sum())
    slots = torch.zeros(4, 9, dtype=torch.bool)
    where = torch.randperm(slots.numel(), generator=g)[:count]
    slots.view(-1)[where] = True
    h = torch.randn(4, 9, 6, generator=g)
    feats = torch.randn(3, 5, 6, generator=g, requires_grad=True)
    ref = h.masked_scatter(slots[..., None], feats[valid])
    mine = place_tokens(h, slots, feats, valid)
    assert torch.equal(mine, ref)
    weight = torch.randn(4, 9, 6, generator=g)
    (grad_ref,) = torch.autograd.grad((ref * weight).sum(), feats)
    (grad_mine,) = torch.autograd.grad((mine * weight).sum(), feats)
    assert torch.equal(grad_mine, grad_ref)

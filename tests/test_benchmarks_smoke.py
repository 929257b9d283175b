"""The GPU benchmarks' `--smoke` mode (tiny dimensions on the CPU) runs end to end and writes its JSON."""

import importlib
import json
import os
import sys
import time

import pytest
import torch

DELAY = 0.25
BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture
def benchmark_module():
    threads = torch.get_num_threads()  # the smoke mode runs single-threaded; give the other tests theirs back
    sys.path.insert(0, BENCHMARKS)
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(BENCHMARKS)
        torch.set_num_threads(threads)


def test_judge_benchmark_smoke(benchmark_module, tmp_path):
    out = tmp_path / "judge.json"
    payload = benchmark_module("janus_judge").main(["--smoke", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["info"]["smoke"] and saved["info"]["command"]
    paths = [r["path"] for r in payload["results"]]
    assert len(paths) == 5 and paths[0].startswith("baseline") and "device pixels" in paths[3] + paths[4]
    assert all(r["images_per_s"] > 0 and r["ratio_vs_baseline"] > 0 for r in payload["results"])
    assert payload["results"][1]["max_abs_diff_vs_baseline"] < 1e-4  # the judge computes the baseline's P(yes)
    assert payload["results"][3]["max_abs_diff_vs_baseline"] < 1e-4  # from device pixels too
    for i in (2, 4):
        assert payload["results"][i]["rows"] == 5 * payload["results"][i]["batch"]  # global + 2 x 2 crops
    assert payload["results"][3]["max_abs_diff_vs_pil_path"] == 0.0 == payload["results"][4]["max_abs_diff_vs_pil_path"]
    assert saved["info"]["device_pixels"]["identical"]  # pixel values equal the processor's on PIL images and crops
    assert "device_pixels_at_least_baseline" in payload["targets"]
    assert payload["host_profile"]["host_bound_img_per_s_global"] > 0


def test_train_benchmark_smoke(benchmark_module, tmp_path, monkeypatch):
    from srum_trl.models import JanusBackend

    decode = JanusBackend.decode_pixels

    def slow_decode(self, tokens):  # a known delay inside one phase, to see where the timer puts it
        time.sleep(DELAY)
        return decode(self, tokens)

    monkeypatch.setattr(JanusBackend, "decode_pixels", slow_decode)
    out = tmp_path / "train.json"
    payload = benchmark_module("janus_train").main(["--smoke", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["info"]["flops_formula"]
    rows = {r["variant"]: r for r in payload["results"]}
    assert len(rows) == 4 and all(r["mfu_6n"] > 0 and r["step_s"] > 0 for r in rows.values())
    lora = next(r for name, r in rows.items() if "lora" in name)
    assert lora["flops_4n2t"] < lora["flops_6n"] and 0 < lora["trainable_params"] < 1e5
    iteration = payload["iteration"]
    assert len(iteration["rounds"]) == 2 and iteration["judge_questions"] == 5 * iteration["images"]
    for rnd in iteration["rounds"]:
        names = [p["phase"].split(":")[0] for p in rnd["phases"]]
        tokens, decode, host, forwards, train = (p["seconds"] for p in rnd["phases"])
        assert names == ["generate", "generate", "judge", "judge", "train"]
        # the known delay is charged to the VQ decode (timed inside generation); training, what is left of the
        # round's measured step time, stays positive only if that step time covered the generation and judging
        assert decode >= DELAY and min(tokens, host, forwards) > 0 and train > 0


def test_generate_calls_benchmark_smoke(benchmark_module, tmp_path):
    out = tmp_path / "calls.json"
    payload = benchmark_module("janus_generate_calls").main(["--smoke", "--calls", "2", "--out", str(out)])
    assert json.loads(out.read_text())["same_tokens_per_seed"] is True
    assert [(r["keep_fast_decoder"], r["call"]) for r in payload["rows"]] == [(False, 1), (False, 2), (True, 1), (True, 2)]


def test_bagel_flow_grpo_benchmark_smoke(benchmark_module, tmp_path):
    out = tmp_path / "flow_grpo.json"
    payload = benchmark_module("bagel_flow_grpo").main(["--smoke", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["smoke"] and saved["settings"]["sde_window"] == 2
    phases = {r["phase"]: r for r in payload["phases"]}
    assert len(phases) == 6 and all(r["seconds_per_round"] > 0 for r in phases.values())
    assert phases["training forward (recorded steps, with gradients)"]["calls_per_round"] == 2  # 4 images, batch 2
    assert sum(r["seconds_per_round"] for name, r in phases.items() if name != "round total") <= \
        phases["round total"]["seconds_per_round"]
    assert [r["sampler"] for r in payload["sampler"]] == ["deterministic (ODE)", "SDE window of 2",
                                                         "SDE on every step"]
    assert all(r["images_per_s"] > 0 for r in payload["sampler"])
    assert payload["trainer_logs"][-1]["sampling/sampling_logp_difference/max"] < 1e-3  # float32 on the CPU


def test_multigpu_reference_loads_safely(benchmark_module, tmp_path):
    import pickle

    import torch

    load_reference = benchmark_module("janus_multigpu").load_reference
    reference = {"settings": {"model": "tiny", "seed": 0, "srum": {"lr": 0.05}, "prompts": ["a red circle"]},
                 "trainers": {"srum": {"rounds": [{"prompts": ["a"], "tokens": torch.arange(4), "guidance_margin": None}],
                                       "logs": [{"loss": 0.5, "step": 1}], "update": {"w": torch.ones(2)},
                                       "advantages": [], "train_s": 1.5}}}
    torch.save(reference, tmp_path / "ref.pt")
    loaded = load_reference(str(tmp_path / "ref.pt"))
    assert loaded["settings"] == reference["settings"] and torch.equal(
        loaded["trainers"]["srum"]["rounds"][0]["tokens"], torch.arange(4))

    class Payload:  # what an unsafe load would run: any pickled callable
        def __reduce__(self):
            return (os.system, ("echo unsafe",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"settings": Payload()}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_reference(str(tmp_path / "evil.pt"))

"""Two CPU processes (gloo), started by `accelerate launch` with the shipped DDP and FSDP2 configs, against one
process on the same global batch: SRUMTrainer and GRPOUMMTrainer (GRPO with dense advantages, and best-of-n self-SFT,
whose processes hold different numbers of rows) shard their rollouts, log the reward and reward-map statistics of the
whole batch, and reach the loss, gradient norm and parameter update (SGD) of the single process, in float32.

The single-process run is made here, in the test's own process (no process group). The two processes run
`benchmarks/janus_multigpu.py --cpu`: the trainers' own code, with the sampled tokens replaced by those of the
single-process run for the same global rows, so that sampling randomness does not enter."""

import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "janus_multigpu.py")

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("janus_multigpu", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    path = str(tmp_path_factory.mktemp("multiprocess") / "reference.pt")
    script.run_reference(script.parse_args(["--cpu", "--out", path + ".json", "--reference", path]))
    return path


@pytest.mark.parametrize("config, distributed_type", [("ddp.yaml", "MULTI_CPU"), ("fsdp_janus.yaml", "FSDP")])
def test_two_processes_match_one_process(reference, tmp_path, config, distributed_type):
    out = str(tmp_path / "result.json")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(ROOT, "examples", "accelerate", config), "--num_processes", "2", "--main_process_port",
           str(_free_port()), SCRIPT, "--cpu", "--out", out, "--reference", reference]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout[-4000:], proc.stderr[-4000:])
    with open(out) as f:
        result = json.load(f)
    assert set(result["trainers"]) == {"srum", "grpo", "sft"}
    for kind, trainer in result["trainers"].items():
        setup = trainer["setup"]
        assert setup["distributed_type"].endswith(distributed_type) and setup["num_processes"] == 2, setup
        if distributed_type == "FSDP":
            assert setup["fsdp_version"] == 2 and setup["local_parameter_fraction"] < 0.6, setup  # really sharded
        checks = trainer["checks"]
        for name in ("rollouts_sharded", "rewards_and_maps_gathered", "loss_and_grad_norm_equal",
                     "parameter_update_equal"):
            assert checks[name], (kind, name, trainer)
        assert trainer["update"]["relative_l2_error"] < 1e-3 and trainer["update"]["reference_norm"] > 0
        for share in trainer["rounds"][0]["per_rank"]:  # each process sampled its own half of the round
            assert len(share) == len(trainer["rounds"][0]["global_reference"]) // 2
    grpo = result["trainers"]["grpo"]
    assert grpo["checks"]["groups_whole_in_global_batch"] and grpo["checks"]["advantages_equal"]
    assert grpo["groups_split_over_processes"] > 0  # a group of num_generations spans both processes
    assert result["passed"]

"""Two CPU processes under DistributedDataParallel (gloo): the SRUM loss routed through the wrapper with
`backend.using(ddp)` gives the same, synchronised gradients on every rank, although each rank trains on its own
prompt. (Without the routing the ranks' gradients differ: the wrapper's forward never ran.)"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from srum_trl.models import GenerationConfig, JanusBackend
    from srum_trl.models.janus import build_tiny_janus

    model, processor = build_tiny_janus("a red blue circle square yes no".split(), seed=0)
    backend = JanusBackend(model, processor)
    prompts = [["a red circle"], ["a blue square"]][rank]
    rollout = backend.generate(prompts, GenerationConfig(guidance=3.0), seed=rank)
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    with backend.using(ddp):
        loss = backend.token_losses(prompts, rollout).mean()
    loss.backward()
    grad = model.model.generation_head.vision_head.weight.grad.clone()
    gathered = [torch.zeros_like(grad) for _ in range(world)]
    dist.all_gather(gathered, grad)
    if rank == 0:
        torch.save({"grads": gathered}, out)
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_gradients_are_synchronised(tmp_path):
    out = str(tmp_path / "grads.pt")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2)
    grads = torch.load(out)["grads"]
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])

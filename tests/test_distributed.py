"""Two CPU processes under DistributedDataParallel (gloo): the SRUM loss routed through the wrapper with
`backend.using(ddp)` gives the same, synchronised gradients on every rank, although each rank trains on its own
prompt. (Without the routing the ranks' gradients differ: the wrapper's forward never ran.)

The processes meet through a file store in the test's own folder (no TCP port that another process on the machine
could take between choosing it and binding it), run one thread each (two ranks on a two-core machine), fail within
two minutes rather than hang if a collective stalls, and tear down in order: DDP released, a barrier, then the
process group destroyed by both, so neither rank exits while the other still talks to it."""

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world, store, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
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
        del ddp
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo")
def test_ddp_gradients_are_synchronised(tmp_path, monkeypatch):
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # the spawned processes inherit the environment
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if os.path.exists("/sys/class/net/lo"):
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # gloo's pairs on loopback, not the hostname's interface
    out = str(tmp_path / "grads.pt")
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), out), nprocs=2)
    grads = torch.load(out)["grads"]
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])

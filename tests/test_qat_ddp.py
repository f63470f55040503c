"""Two gloo processes train the same model as one process with the same global batch
(one epoch, BN trained with global-batch statistics, so no best-epoch choice can differ)."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

RECIPE = {"extends": "w4a4", "name": "ddp-test", "weights": {"quantizer": "lsq"},
          "activations": {"quantizer": "lsq+"},
          "steps": ["calibrate", {"qat": {"epochs": 1, "batch_size": 64, "lr": 0.02, "val_samples": 200,
                                          "freeze_bn_after": 1}}]}


def _train(folder: str, data_dir: str) -> dict[str, torch.Tensor]:
    import lowbit
    from lowbit.data import dataset_tensors, load_dataset
    from lowbit.zoo import SmallCNN

    torch.set_num_threads(1)
    model = SmallCNN()
    model.load_state_dict(load_file(os.path.join(folder, "float.safetensors")))
    train = load_dataset("mnist", "train", data_dir=data_dir, download=False)
    x, y = dataset_tensors(train, torch.arange(1200))
    qm = lowbit.quantize(model.eval(), RECIPE, calib=x[:256], train=(x, y), progress=False)
    return {k: v.detach().clone().contiguous() for k, v in qm.state_dict().items()}


def _worker(rank: int, world: int, folder: str, data_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        state = _train(folder, data_dir)
        save_file(state, os.path.join(folder, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    from lowbit.zoo import SmallCNN

    folder = tmp_path_factory.mktemp("ddp")
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in SmallCNN().state_dict().items()}, str(folder / "float.safetensors"))
    single = _train(str(folder), str(data_dir))
    mp.spawn(_worker, args=(2, str(folder), str(data_dir)), nprocs=2, join=True)
    return single, load_file(str(folder / "rank0.safetensors")), load_file(str(folder / "rank1.safetensors"))


@pytest.mark.skipif(sys.platform == "win32", reason="file:// rendezvous")
def test_two_processes_keep_identical_weights_and_quantizers(runs):
    _, r0, r1 = runs
    assert set(r0) == set(r1)
    for key in r0:
        assert torch.equal(r0[key], r1[key]), f"ranks differ in {key}"


@pytest.mark.skipif(sys.platform == "win32", reason="file:// rendezvous")
@pytest.mark.xfail(strict=True, reason="open defect: 2 gloo processes do not yet reproduce the 1-process "
                   "trajectory (about a third of the weights differ after one epoch); see issue 11's note")
def test_two_processes_end_with_the_weights_of_one(runs):
    single, r0, _ = runs
    for key, value in single.items():
        close = torch.isclose(r0[key], value, atol=1e-5, rtol=1e-4).float().mean().item()
        # Float sums in another order can move a weight across a rounding boundary: one
        # code step in a handful of weights, never a different model.
        assert close > 0.99, f"{key}: only {close:.1%} of 2-process values match the 1-process run"

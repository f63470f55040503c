"""QAT under several processes: what each rank sees, logs and draws, and how they stop together."""
from __future__ import annotations

import json
import os
import sys
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp

import lowbit
from lowbit.errors import LowbitError
from lowbit.qat import distributed as D
from tests.test_qat_fixes import _calib, _calibrated, _data, _model, _recipe


def test_under_torchrun_cuda_means_the_gpu_of_the_local_rank(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert D.process_device("cuda") == "cuda:1"
    assert D.process_device("cpu") == "cpu"
    with pytest.raises(LowbitError, match=r"--device cuda:0 under torchrun with 2 processes.*cuda:1"):
        D.process_device("cuda:0")


def test_one_process_keeps_the_device_it_was_given(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert D.process_device("cuda:3") == "cuda:3"


def test_each_process_seeds_its_own_draws_and_rank_zero_keeps_the_seed(monkeypatch):
    assert D.rank_seed(12345) == 12345  # one process: runs reproduce what they did before
    monkeypatch.setattr(D, "rank", lambda: 1)
    other = D.rank_seed(12345)
    assert other != 12345 and 0 <= other < 2**63


def test_the_stochastic_sign_draws_from_the_generator_it_is_given():
    from lowbit.quant.learned.binary import BinaryConnectQuantizer
    from lowbit.quant.quantizer import UniformQuantizer
    from lowbit.quant.spec import QuantSpec

    source = UniformQuantizer(QuantSpec(bits=1, signed=True, symmetric=True, per_channel=True, grid="midrise"))
    source.set_params(torch.full((8,), 0.2), torch.zeros(8))
    source.calibrated = True
    q = BinaryConnectQuantizer(source, "weight", stochastic=True).train()
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(0)) * 0.1
    q.draws = torch.Generator()
    outs = []
    for global_seed in (1, 2):  # the global generator's state must not matter
        torch.manual_seed(global_seed)
        q.draws.manual_seed(7)
        outs.append(q.fake_quant(w))
    assert torch.equal(outs[0], outs[1])
    assert set(outs[0].div(0.1).round().unique().tolist()) == {-1.0, 1.0}
    q.draws.manual_seed(8)
    assert not torch.equal(q.fake_quant(w), outs[0])  # and it does sample


class _NonFiniteLoss:
    """torch.nn.functional, except that the cross entropy is NaN (one process's loss going bad)."""

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(torch.nn.functional, name)

    @staticmethod
    def cross_entropy(*args, **kwargs) -> torch.Tensor:  # noqa: ANN002, ANN003
        return torch.nn.functional.cross_entropy(*args, **kwargs) * float("nan")


def _worker(rank: int, world: int, folder: str, recipe: dict, nan_rank: int) -> None:
    import torch.distributed as dist

    import lowbit.qat.engine as engine

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    if rank == nan_rank:
        engine.F = _NonFiniteLoss()
    validated: list[int] = []  # how many held-out labels this process scored, per validation
    score = lowbit.api.evaluate

    def counting(model, data, **kw):  # noqa: ANN001, ANN003, ANN202
        batches = list(data)
        validated.append(sum(len(y) for _, y in batches))
        return score(model, batches, **kw)

    lowbit.api.evaluate = counting
    try:
        try:
            qm = lowbit.quantize(_model(), recipe, calib=_calib(), train=_data(), progress=False)
            result = {"ok": qm.meta["qat"]["history"], "validated": validated, "val_samples": qm.meta["qat"]["val_samples"]}
        except Exception as e:  # noqa: BLE001 - reported to the test
            result = {"error": f"{type(e).__name__}: {e}"}
        with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _run_two(tmp_path, recipe: dict, nan_rank: int = -1) -> list[dict]:
    mp.spawn(_worker, args=(2, str(tmp_path), recipe, nan_rank), nprocs=2, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.skipif(sys.platform == "win32", reason="file:// rendezvous")
def test_every_process_logs_the_metrics_of_the_global_batch(tmp_path):
    r0, r1 = _run_two(tmp_path, _recipe("lsq", "lsq+", 4, 4, epochs=2))
    assert "ok" in r0 and "ok" in r1, (r0, r1)
    for a, b in zip(r0["ok"], r1["ok"]):  # each rank summed its own shard before: the two differed
        assert (a["train_loss"], a["train_top1"]) == (b["train_loss"], b["train_top1"])
        assert a["processes"] == 2
        assert a["val_top1"] == b["val_top1"]
    # each process scored its half of the held-out images (every one did all of them before)
    n = r0["val_samples"]
    assert r0["validated"] == [(n + 1) // 2] * 2 and r1["validated"] == [n // 2] * 2, (n, r0["validated"], r1["validated"])


def test_one_process_validates_every_held_out_image():
    from lowbit.qat.engine import held_out_top1

    qm, _ = _calibrated(_recipe("lsq", "lsq+", 4, 4))
    x, y = _data()
    val = torch.utils.data.TensorDataset(x[:101], y[:101])
    expected = 100 * lowbit.evaluate(qm, [(x[:101], y[:101])])
    assert held_out_top1(qm, val, torch.device("cpu")) == pytest.approx(expected, abs=1e-9)


@pytest.mark.skipif(sys.platform == "win32", reason="file:// rendezvous")
def test_a_non_finite_loss_on_one_process_stops_both_with_the_same_error(tmp_path):
    r0, r1 = _run_two(tmp_path, _recipe("lsq", "lsq+", 4, 4, epochs=1), nan_rank=1)
    # (rank 0 waited in the gradient all-reduce for the rank that had stopped)
    assert r1.get("error", "").startswith("NumericalError: QAT loss became nan at epoch 1, step 0:"), (r0, r1)
    assert r0.get("error", "").startswith("NumericalError: QAT loss became non-finite on another process (here "), r0
    assert "at epoch 1, step 0: lower lr" in r0["error"]

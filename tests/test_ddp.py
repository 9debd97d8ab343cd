"""DDP (two CPU processes, gloo) trains the same weights as one process with twice the batch.

Why they agree: DistributedSampler gives rank r the samples perm[r::2] of one seeded permutation,
so step k of the two ranks (batch b each) covers perm[2kb:2kb + 2b], the single process's batch
of 2b at step k; each sample's augmentation draws are a pure function of (seed, epoch, sample
index), so both see the same pairs; every loss is a mean over the batch and every norm is an
InstanceNorm (per sample), so the mean of the ranks' gradients (DDP's all-reduce) is the gradient
of the single process's loss. What differs is only the order of float additions.

One exception, which is Adam's and not DDP's: a convolution's bias followed by an InstanceNorm
without affine parameters is removed by the normalisation, so its true gradient is zero and the
computed one is float rounding noise; Adam divides by that noise's own scale and moves such a
bias by up to about lr per step, in a direction set by the noise (measured here: up to 4.4 x lr
after 4 steps in both setups alike). Those biases do not change any output; they are compared by
the outputs they feed, every other tensor directly.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

from hybrid.checkpoint import load_checkpoint
from hybrid.models.discriminator import MultiscaleDiscriminator
from hybrid.models.generator import Generator
from hybrid.train import train
from tests.test_train import AUG, MODEL, Blobs, rows, train_cfg

# Measured on the CPU: the largest difference of the compared tensors after 4 steps is 7e-8 (fp32
# rounding of the all-reduce and of the batch reductions, through Adam); outputs agree to 1e-6.
ATOL = 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def normalised_away(model: nn.Module) -> set[str]:
    """Names of the convolution biases that an InstanceNorm (no affine) right after removes."""
    names = set()
    for prefix, m in model.named_modules():
        if isinstance(m, nn.Sequential):
            kids = list(m.named_children())
            for (name, a), (_, b) in zip(kids, kids[1:]):
                if (isinstance(a, (nn.Conv2d, nn.ConvTranspose2d)) and a.bias is not None
                        and isinstance(b, nn.InstanceNorm2d) and not b.affine):
                    names.add(f"{prefix}.{name}.bias" if prefix else f"{name}.bias")
    return names


def _rank(rank: int, world: int, port: int, root: str, cfg: dict) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
                       "RANK": str(rank), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    try:
        train(Blobs(8), f"{root}/ddp", f"{root}/work-ddp", MODEL, cfg, AUG)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ddp_matches_single_process(tmp_path, monkeypatch, one_thread):
    per_rank = 2
    # 8 samples: 2 steps per epoch with 2 ranks x 2, or 1 process x 4; 2 epochs (the lr decays)
    cfg = train_cfg(batch_size=per_rank, checkpoint_every=100, sample_every=100, log_every=1)
    mp.start_processes(_rank, args=(2, _free_port(), str(tmp_path), cfg), nprocs=2, join=True,
                       start_method="spawn")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    single = train(Blobs(8), tmp_path / "single", tmp_path / "work-single", MODEL,
                   {**cfg, "batch_size": 2 * per_rank}, AUG)
    # the control: one process with the per-rank batch takes other steps, far beyond the tolerance
    other = train(Blobs(8), tmp_path / "other", tmp_path / "work-other", MODEL,
                  {**cfg, "epochs_decay": 1}, AUG)
    ddp = tmp_path / "ddp"
    G = Generator(**MODEL)
    skip = {"model.safetensors": normalised_away(G),
            "discriminator.safetensors": normalised_away(MultiscaleDiscriminator(G.in_channels + G.out_channels, 8))}
    for name in ("model.safetensors", "discriminator.safetensors"):
        a, b, c = load_file(ddp / name), load_file(single / name), load_file(other / name)
        assert a.keys() == b.keys() and skip[name] < a.keys()
        worst = max(float((a[k] - b[k]).abs().max()) for k in a if k not in skip[name])
        assert worst <= ATOL, f"{name}: largest difference {worst:.3g}"
        assert max(float((c[k] - b[k]).abs().max()) for k in c if k not in skip[name]) > 100 * ATOL
    x = torch.cat([torch.cat([s["image"], s["depth"], s["edge"]])[None] for s in Blobs(4).items])
    with torch.no_grad():
        out_ddp, out_one = load_checkpoint(ddp)(x), load_checkpoint(single)(x)
    for d in out_one:
        for k in ("image", "mask"):
            torch.testing.assert_close(out_ddp[d][k], out_one[d][k], atol=ATOL, rtol=0)
    steps_ddp, steps_one = rows(tmp_path / "work-ddp" / "losses.csv"), rows(tmp_path / "work-single" / "losses.csv")
    assert [r["step"] for r in steps_ddp] == [r["step"] for r in steps_one] == ["1", "2", "3", "4"]
    for a, b in zip(steps_ddp, steps_one):  # the ranks' mean loss is the single process's loss
        for k in ("G_total", "D_total"):
            assert float(a[k]) == pytest.approx(float(b[k]), rel=1e-5, abs=1e-6), (a["step"], k)

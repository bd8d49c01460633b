"""The seed's two usage snippets, as its document writes them, run on ringsim.

    python examples/seed_usage.py                                       # one device
    torchrun --standalone --nproc-per-node 2 examples/seed_usage.py     # a ring of 2

Only the import line differs from the seed's document (``dilated_attention_pytorch`` there,
``ringsim.gpu`` here); ``device``, ``world_size`` and the tensors are the surroundings the
snippets assume. Under torchrun each rank holds its shard of the sequence (NCCL on GPUs,
gloo on CPUs) and ``ring_size=world_size`` runs the ring. After each snippet the script
checks the result: in eval mode (no dropout) the module's output equals dilated attention
on the whole sequence on one device, within float32's tolerance, and it says so.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ringsim.gpu import (
    RingDilatedAttentionHybrid,
    RingMultiheadDilatedAttentionHybrid,
    dilated_attention,
)

TOLERANCE = 2e-5  # float32, spec §9


def setup() -> tuple[torch.device, int, int]:
    """``(device, world_size, rank)``: a process group under torchrun, else one device."""
    if "RANK" not in os.environ:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu"), 1, 0
    cuda = torch.cuda.is_available()
    rank = int(os.environ["RANK"])
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return device, dist.get_world_size(), rank


def main() -> None:
    device, world_size, rank = setup()
    gen = torch.Generator().manual_seed(0)  # every rank draws the same global tensors
    full = [torch.randn(1, 512, 8, 64, generator=gen) for _ in range(3)]
    c = 512 // world_size
    q, k, v = (x[:, rank * c : (rank + 1) * c].to(device) for x in full)  # this rank's shard

    # --- the seed's usage example ----------------------------------------------------------
    model = RingDilatedAttentionHybrid(
        segment_lengths=[2048, 4096],
        dilation_rates=[1, 2],
        dropout=0.1,
        device=device,
        dtype=torch.float32,
        ring_size=world_size,
        enable_memory_pool=True,
        use_flash_attention=True,
    )

    # Use like any other attention
    output = model(q, k, v, is_causal=True)
    # ---------------------------------------------------------------------------------------

    print(f"[rank {rank}] output {tuple(output.shape)}, mean {output.mean().item():.6f}, "
          f"NaN: {bool(output.isnan().any())}, kernel {model.last_kernel.value}, "
          f"{model.memory_pool}", flush=True)  # fmt: skip
    want = dilated_attention(*(x.to(device) for x in full), [2048, 4096], [1, 2], is_causal=True)
    error = (model.eval()(q, k, v, is_causal=True) - want[:, rank * c : (rank + 1) * c]).abs()
    assert float(error.max()) <= TOLERANCE, float(error.max())

    # --- the seed's multihead wrapper ------------------------------------------------------
    multihead = RingMultiheadDilatedAttentionHybrid(
        embed_dim=768,
        num_heads=12,
        segment_lengths=[2048, 4096],
        dilation_rates=[1, 2],
        layer_norm=True,  # MAGNETO support
        gamma_init=0.5,
    )

    query = key = value = torch.randn(2, 256, 768, generator=gen)
    output, _ = multihead(query, key, value, is_causal=True)
    # ---------------------------------------------------------------------------------------

    print(f"[rank {rank}] multihead output {tuple(output.shape)}, weights {_}", flush=True)
    assert output.shape == query.shape and _ is None and not output.isnan().any()
    print(f"[rank {rank}] PASS seed usage: world_size={world_size}, "
          f"max error {float(error.max()):.1e} <= {TOLERANCE}", flush=True)  # fmt: skip
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""The table and the files of :mod:`ringsim.gpu.harness.bench_ring`: one :class:`Row` per
(problem, n, mask, pass), printed, and written as ``bench_ring.json`` and ``bench_ring.md``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from ringsim.cli.tables import markdown_table


@dataclass
class Row:
    problem: str
    n: int
    world_size: int
    causal: bool
    pass_: str
    layout: str = "contiguous"
    kernel: str = ""
    ms: float | None = None
    tflops_per_gpu: float | None = None
    one_gpu_ms: float | None = None
    efficiency: float | None = None
    peak_gib: float | None = None
    one_gpu_peak_gib: float | None = None
    bytes_sent: int = 0
    closed_form_bytes: int = 0
    transfer_steps: int = 0
    block_bytes: int = 0  # the largest K/V block a rank receives at one step
    comm_ms: float | None = None
    compute_ms: float | None = None
    hidden: float | None = None
    bandwidth_gbs: float | None = None
    torch_cp_ms: float | None = None
    torch_cp_max_diff: float | None = None  # max |out - ours| of its output (same function)
    shard_peak_gib: float | None = None  # the single-device path on n/P alone
    peak_target_gib: float | None = None  # shard_peak + two blocks in flight
    torch_cp_tflops_per_gpu: float | None = None
    status: str = "ok"

    def cells(self) -> list[str]:
        def f(x, spec):
            return "-" if x is None else format(x, spec)

        return [
            self.problem,
            str(self.n),
            "causal" if self.causal else "full",
            self.layout,
            self.pass_,
            f(self.ms, ".2f"),
            f(self.tflops_per_gpu, ".0f"),
            f(self.one_gpu_ms, ".2f"),
            f(self.efficiency, ".2f"),
            f(self.peak_gib, ".2f"),
            f(self.peak_target_gib, ".2f"),
            f(self.comm_ms, ".1f"),
            f(self.compute_ms, ".1f"),
            f(self.hidden, ".2f"),
            f"{self.bytes_sent / 2**20:.0f}/{self.closed_form_bytes / 2**20:.0f}",
            f(self.torch_cp_tflops_per_gpu, ".0f"),
            self.status,
        ]

    def json(self) -> dict:
        out = asdict(self)
        out["pass"] = out.pop("pass_")
        return out


HEADER = [
    "problem",
    "n",
    "mask",
    "layout",
    "pass",
    "ms",
    "TFLOP/s/GPU",
    "1-GPU ms",
    "eff.",
    "peak GiB",
    "target GiB",
    "comm ms",
    "compute ms",
    "hidden",
    "MiB sent/closed",
    "CP TFLOP/s/GPU",
    "status",
]


def write(args, env: dict, rows: list[Row]) -> None:
    suffix = "_smoke" if args.smoke else ""
    args.out.mkdir(parents=True, exist_ok=True)
    report = dict(env, rows=[r.json() for r in rows], notes=NOTES)
    (args.out / f"bench_ring{suffix}.json").write_text(json.dumps(report, indent=1))
    md = [
        f"# ringsim.gpu.harness.bench_ring{suffix}",
        "",
        f"{env['device']} x{env['world_size']}, torch {env['torch']}, NCCL {env['nccl']}, "
        f"{env['date']}; b=1, h={args.heads}, d={args.head_dim}, longnet.",
        "",
        markdown_table(HEADER, [r.cells() for r in rows]),
        "",
        *NOTES,
    ]
    (args.out / f"bench_ring{suffix}.md").write_text("\n".join(md) + "\n")


NOTES = [
    "- ms: the ring's median time per call, the slowest rank's; TFLOP/s/GPU: useful FLOPs "
    "(4 d per selected query-key pair, causal exact; forward + backward 3.5x) / P / ms.",
    "- 1-GPU ms: the single-device path on the whole problem; eff.: 1-GPU ms / (P x ms).",
    "- peak GiB: max_memory_allocated during one ring call beyond what was allocated before; "
    "target GiB: the single-device path's peak on n/P alone plus two K/V blocks in flight.",
    "- comm ms / compute ms: the ring with no attention / with exchanges that return at once.",
    "- hidden: (T_comm + T_compute - T_ring) / T_comm, forward only, where the rank sends.",
    "- MiB sent/closed: bytes this rank sends (from its plan) / spec §5's closed form.",
    "- CP: torch.distributed.tensor.experimental.context_parallel around SDPA, same kernel, "
    "all-to-all rotation; its load balancer off on contiguous rows, on (head-tail: the zigzag "
    "layout's chunks) on zigzag rows; its output is compared with ours (torch_cp_max_diff in "
    "the JSON).",
]

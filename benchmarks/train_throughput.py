"""Training throughput and MFU under Ray Train + DeepSpeed, both MoE implementations, 1..N GPUs.

For each (implementation, GPU count) a real training run of the chosen preset (bf16, ZeRO-1,
the same per-GPU micro batch) on the prepared stdlib corpus; tokens/s is read from the run's
last metrics window (after warm-up). MFU divides model FLOPs by GPU time, against two peaks:
the dense bf16 matmul rate measured on this card in the same run (the practical limit), and
the card's nominal dense bf16 peak.

Model FLOPs per token: 6 x activated parameters (without the input embedding) + attention
6 x layers x seq x heads x (qk_dim + v_dim) (PaLM's count); the MTP module is left out.

Run: python benchmarks/train_throughput.py --preset small --gpus 1 2 --steps 40
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import ray  # noqa: E402
import torch  # noqa: E402

from cluster.config import load_config  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.info import model_info  # noqa: E402
from train.data import prepare_corpus  # noqa: E402
from train.job import run_training  # noqa: E402

NOMINAL_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}


def dense_matmul_tflops(n: int = 8192, iters: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e12


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    info = model_info(cfg)
    if cfg.attention == "mla":
        attn_dims = cfg.qk_head_dim + cfg.v_head_dim
    else:
        attn_dims = 2 * cfg.head_dim
    return 6 * info.activated_params + 6 * cfg.n_layers * seq_len * cfg.n_heads * attn_dims


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--impl", nargs="+", default=["moray", "deepspeed"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per GPU per step")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()

    dense = dense_matmul_tflops()
    gpu_name = torch.cuda.get_device_name(0)
    nominal = next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in gpu_name), float("nan"))
    work = Path(tempfile.mkdtemp(prefix="moray-bench-"))
    prepare_corpus(None, work / "corpus", vocab_size=2048, progress=False)
    ray.init(include_dashboard=False)
    rows = []
    for gpus in args.gpus:
        for impl in args.impl:
            name = f"{args.preset}-{impl}-{gpus}gpu"
            cfg = load_config(args.preset, [
                f"train.moe_impl={impl}", f"train.num_workers={gpus}", "train.use_gpu=true",
                f"train.batch_size={args.micro_batch * gpus}", f"train.seq_len={args.seq_len}",
                f"train.max_steps={args.steps}", f"train.log_every={args.steps // 2}",
                f"train.checkpoint_every={args.steps}", f"train.warmup_steps={args.steps // 4}",
                f"train.data_dir={work / 'corpus'}", f"train.storage_path={work / 'runs'}", f"train.run_name={name}"])
            result = run_training(cfg)
            lines = (work / "runs" / name / "metrics.jsonl").read_text().splitlines()
            last = json.loads(lines[-1])
            first = json.loads(lines[0])
            fpt = flops_per_token(cfg.model, args.seq_len)
            achieved = fpt * last["tokens_per_s"] / gpus / 1e12
            row = {"impl": impl, "gpus": gpus, "tokens_per_s": last["tokens_per_s"],
                   "tokens_per_s_per_gpu": last["tokens_per_s"] / gpus, "model_tflops_per_gpu": achieved,
                   "mfu_vs_measured_dense": achieved / dense, "mfu_vs_nominal": achieved / nominal,
                   "loss_first_window": first["loss"], "loss_last_window": last["loss"],
                   "error": result.error}
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"date": datetime.date.today().isoformat(), "gpu": gpu_name, "preset": args.preset,
            "dense_bf16_tflops_measured": dense, "nominal_bf16_tflops": nominal, "seq_len": args.seq_len,
            "micro_batch_per_gpu": args.micro_batch, "steps": args.steps, "torch": torch.__version__}
    print(json.dumps(meta))
    print(f"{'impl':>10} {'gpus':>4} {'tokens/s':>10} {'tok/s/gpu':>10} {'TFLOP/s/gpu':>12} {'MFU(dense)':>11} "
          f"{'MFU(nominal)':>13} {'loss':>14}")
    for r in rows:
        print(f"{r['impl']:>10} {r['gpus']:>4} {r['tokens_per_s']:>10.0f} {r['tokens_per_s_per_gpu']:>10.0f} "
              f"{r['model_tflops_per_gpu']:>12.1f} {r['mfu_vs_measured_dense']:>11.1%} {r['mfu_vs_nominal']:>13.1%} "
              f"{r['loss_first_window']:>6.2f}->{r['loss_last_window']:<6.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

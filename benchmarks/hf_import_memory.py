"""Peak memory of `moray checkpoint import-hf` on a synthetic DeepSeek-V2-Lite-shaped checkpoint.

Writes a Hugging Face DeepSeek-V2 dir with DeepSeek-V2-Lite's layer shapes (dim 2048, vocab
102400, 16 MLA heads, 64 routed experts of 1408 + 2 shared, a dense first layer of 10944) but
only `--layers` layers of random bf16 weights, in shards of at most `--shard-gb`, into a temp
dir. Then, each in a fresh subprocess whose peak RSS (VmHWM) is its own:

- **idle**: the interpreter with torch and moray imported, converting nothing (the floor);
- **moray**: `import_hf` (streams tensor by tensor);
- **in-memory baseline**: what a converter without streaming does: `safetensors.torch.load_file`
  every shard, stack the experts per layer, `save_checkpoint`.

Prints peak RSS of each against the largest safetensors file, and deletes everything after.

Run: python benchmarks/hf_import_memory.py --layers 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.safetensors_stream import StreamWriter  # noqa: E402

V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
    "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_attention_heads": 16,
    "num_key_value_heads": 16, "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
    "first_k_dense_replace": 1, "moe_layer_freq": 1, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
    "scoring_func": "softmax", "norm_topk_prob": False, "routed_scaling_factor": 1.0, "q_lora_rank": None,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000, "hidden_act": "silu",
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    "tie_word_embeddings": False, "attention_bias": False, "bos_token_id": 100000, "eos_token_id": 100001,
}


def hf_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Names and [out, in] shapes of a DeepSeek-V2 checkpoint, in the order released shards hold them."""
    d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    qk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    out = [("model.embed_tokens.weight", (cfg["vocab_size"], d))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out += [(f"{p}.input_layernorm.weight", (d,)), (f"{p}.post_attention_layernorm.weight", (d,)),
                (f"{p}.self_attn.q_proj.weight", (heads * qk, d)),
                (f"{p}.self_attn.kv_a_proj_with_mqa.weight", (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"], d)),
                (f"{p}.self_attn.kv_a_layernorm.weight", (cfg["kv_lora_rank"],)),
                (f"{p}.self_attn.kv_b_proj.weight",
                 (heads * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]), cfg["kv_lora_rank"])),
                (f"{p}.self_attn.o_proj.weight", (d, heads * cfg["v_head_dim"]))]
        if i < cfg["first_k_dense_replace"]:
            inter = cfg["intermediate_size"]
            out += [(f"{p}.mlp.gate_proj.weight", (inter, d)), (f"{p}.mlp.up_proj.weight", (inter, d)),
                    (f"{p}.mlp.down_proj.weight", (d, inter))]
            continue
        inter, shared = cfg["moe_intermediate_size"], cfg["moe_intermediate_size"] * cfg["n_shared_experts"]
        out.append((f"{p}.mlp.gate.weight", (cfg["n_routed_experts"], d)))
        for j in range(cfg["n_routed_experts"]):
            out += [(f"{p}.mlp.experts.{j}.gate_proj.weight", (inter, d)),
                    (f"{p}.mlp.experts.{j}.up_proj.weight", (inter, d)),
                    (f"{p}.mlp.experts.{j}.down_proj.weight", (d, inter))]
        out += [(f"{p}.mlp.shared_experts.gate_proj.weight", (shared, d)),
                (f"{p}.mlp.shared_experts.up_proj.weight", (shared, d)),
                (f"{p}.mlp.shared_experts.down_proj.weight", (d, shared))]
    return out + [("model.norm.weight", (d,)), ("lm_head.weight", (cfg["vocab_size"], d))]


def write_synthetic(hf_dir: Path, layers: int, shard_bytes: int) -> list[Path]:
    """The checkpoint, one random tensor in memory at a time; returns its shard files."""
    cfg = dict(V2_LITE, num_hidden_layers=layers)
    hf_dir.mkdir(parents=True)
    (hf_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in hf_tensors(cfg):
        nbytes = torch.Size(shape).numel() * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map, files = {}, []
    for k, shard in enumerate(shards, start=1):
        file = hf_dir / f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        with StreamWriter(file, [(n, torch.bfloat16, s) for n, s in shard], metadata={"format": "pt"}) as writer:
            for name, shape in shard:
                tensor = torch.ones(shape) if "norm" in name else torch.randn(shape) * 0.02
                writer.write(name, tensor.to(torch.bfloat16))
                weight_map[name] = file.name
        files.append(file)
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return files


IDLE = "import torch, model.hf"
MORAY = "from model.hf import import_hf; import_hf({src!r}, {dst!r}, progress=False)"
IN_MEMORY = """
import json, torch
from pathlib import Path
from safetensors.torch import load_file
from model.checkpoint import save_checkpoint
from model.hf import tensor_links
from model.hf_config import hf_model_from_config
hf = hf_model_from_config(Path({src!r}))
tensors = {{}}
for file in sorted(Path({src!r}).glob("*.safetensors")):
    tensors.update(load_file(file))
state = {{}}
for link in tensor_links(hf.cfg, hf.arch):
    if link.stacked:
        state[link.moray] = torch.stack([tensors.pop(n).t() for n in link.hf])
    elif link.hf:
        state[link.moray] = tensors[link.hf[0]]
    else:
        state[link.moray] = torch.zeros(hf.cfg.moe.n_routed_experts)
save_checkpoint({dst!r}, hf.cfg, state)
"""


def peak_rss_bytes(code: str) -> int:
    """Peak RSS of a fresh interpreter running `code`: its VmHWM at exit. (ru_maxrss would not
    do: Linux carries it over from the parent through fork and exec, and this parent has just
    written gigabytes.)"""
    report = ("\nprint('VmHWM', next(l.split()[1] for l in open('/proc/self/status') "
              "if l.startswith('VmHWM')))")
    done = subprocess.run([sys.executable, "-c", code + report], check=True, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    return int(done.stdout.split("VmHWM")[-1]) * 1024  # kB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="layers (the first is dense); 2 is ~2.1 GB")
    parser.add_argument("--shard-gb", type=float, default=1.0, help="largest safetensors shard to write")
    parser.add_argument("--workdir", default=None, help="where to put the temp dir (default: $TMPDIR)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="moray-hf-mem-", dir=args.workdir))
    try:
        files = write_synthetic(work / "hf", args.layers, int(args.shard_gb * 1024**3))
        total = sum(f.stat().st_size for f in files)
        largest = max(f.stat().st_size for f in files)
        src = str(work / "hf")
        idle = peak_rss_bytes(IDLE)
        moray = peak_rss_bytes(MORAY.format(src=src, dst=str(work / "moray")))
        shutil.rmtree(work / "moray")
        baseline = peak_rss_bytes(IN_MEMORY.format(src=src, dst=str(work / "baseline")))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    gib = 1024**3
    print(f"machine: {platform.node()} ({platform.processor() or platform.machine()}), "
          f"torch {torch.__version__}, date {datetime.date.today()}")
    print(f"synthetic DeepSeek-V2-Lite shapes, {args.layers} layers: {len(files)} shards, "
          f"{total / gib:.2f} GiB total, largest file {largest / gib:.2f} GiB, largest tensor "
          f"{V2_LITE['vocab_size'] * V2_LITE['hidden_size'] * 2 / gib:.2f} GiB (embedding)")
    print("| what | peak RSS GiB | / largest file |")
    print("| --- | ---: | ---: |")
    for what, rss in (("idle interpreter (torch + moray imported)", idle), ("moray import_hf", moray),
                      ("in-memory baseline (load_file + stack + save_checkpoint)", baseline)):
        print(f"| {what} | {rss / gib:.2f} | {rss / largest:.2f} |")
    if moray >= 2 * largest:
        raise SystemExit("import_hf peaked at >= 2x the largest safetensors file")


if __name__ == "__main__":
    main()

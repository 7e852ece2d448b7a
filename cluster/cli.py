"""The `moray` command line.

Bad input (config, data, checkpoint) ends with exit code 2 and one line saying what and where;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

from model.config import CUDA_GRAPH_MODES, ConfigError


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that mean bad input rather than a bug (imported late: `moray --help` stays fast)."""
    from actors.placement import PlacementError
    from cluster.experts import ExpertsError
    from cluster.jobs import JobError
    from model.checkpoint import CheckpointError
    from model.tokenizer import TokenizerError
    from train.data import DataError

    return (ConfigError, CheckpointError, DataError, TokenizerError, JobError, ExpertsError, PlacementError)


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from train.data import prepare_corpus

    inputs = [Path(p) for p in args.input] if args.input else None
    manifest = prepare_corpus(inputs, Path(args.out), vocab_size=args.vocab_size, progress=not args.quiet,
                              tokenizer=Path(args.tokenizer) if args.tokenizer else None)
    print(f"prepared {args.out}: {len(manifest.source_files)} files, {manifest.source_bytes / 1e6:.1f} MB -> "
          f"{manifest.n_tokens('train'):,} train / {manifest.n_tokens('val'):,} val tokens, "
          f"vocabulary {manifest.vocab_size} ({manifest.tokenizer_path})")
    return 0


def cmd_checkpoint_import_hf(args: argparse.Namespace) -> int:
    import torch

    from model.hf import import_hf

    dtype = None if args.dtype == "keep" else getattr(torch, args.dtype)
    out = import_hf(args.hf_dir, args.out_dir, dtype=dtype, progress=not args.quiet)
    print(f"moray checkpoint: {out}  (serve it: moray serve {out})")
    return 0


def cmd_checkpoint_export_hf(args: argparse.Namespace) -> int:
    from model.hf import export_hf

    out = export_hf(args.checkpoint, args.out_dir, max_shard_bytes=int(args.max_shard_gb * 1024**3),
                    progress=not args.quiet)
    print(f"Hugging Face model: {out}  (transformers: AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


def _print_info_table(info) -> None:
    from model.info import human

    print(f"model {info.name}")
    print(f"  total parameters        {human(info.total_params):>10}  ({info.total_params:,})")
    print(f"  activated per token     {human(info.activated_params):>10}  ({info.activated_params:,})")
    if info.mtp_params:
        print(f"  MTP modules (extra)     {human(info.mtp_params):>10}  ({info.mtp_params:,})")
    print(f"  embedding + head        {human(info.embedding_params):>10}")
    print(f"  KV cache per token      {info.kv_cache_bytes_per_token:>10,} bytes (bf16)")
    print(f"  {'layer':>5} {'kind':>5} {'attention':>10} {'ffn':>10} {'activated':>10}")
    for layer in info.layers:
        print(f"  {layer.index:>5} {layer.kind:>5} {human(layer.attention):>10} {human(layer.ffn):>10} "
              f"{human(layer.activated):>10}")


def cmd_model_info(args: argparse.Namespace) -> int:
    from cluster.config import load_config
    from model.info import model_info

    cfg = load_config(args.config, args.overrides)
    info = model_info(cfg.model)
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
    else:
        _print_info_table(info)
    return 0


def _absolute_paths(overrides: list[str], cfg) -> list[str]:
    """Paths the cluster must find however the job is shipped: data and run storage, absolute."""
    return [*overrides, f"train.data_dir={Path(cfg.train.data_dir).resolve()}",
            f"train.storage_path={Path(cfg.train.storage_path).resolve()}"]


def cmd_train(args: argparse.Namespace) -> int:
    import ray

    from cluster.config import load_config
    from train.job import check_before_start, run_training, start_from

    cfg = load_config(args.config, args.overrides)
    if args.init_from:
        cfg, args.init_from = start_from(cfg, args.init_from)
    check_before_start(cfg)  # one clear line before anything starts
    if args.address:
        from cluster.jobs import submit_and_follow

        overrides = _absolute_paths(list(args.overrides), cfg)
        flags = [f"--init-from={Path(args.init_from).resolve()}"] if args.init_from else []
        flags += [f"--resume-from={Path(args.resume_from).resolve()}"] if args.resume_from else []
        return submit_and_follow(args.address, ["python", "-m", "train", args.config, *overrides, *flags])
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=True,
             num_cpus=None if os.environ.get("RAY_ADDRESS") else max(cfg.train.num_workers + 1, os.cpu_count() or 1))
    result = run_training(cfg, init_from=args.init_from, resume_from=args.resume_from)
    if result.error:
        print(f"moray: training failed: {result.error.splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"run directory:    {result.run_dir}")
    print(f"checkpoint:       {result.checkpoint_dir}")
    print(f"model checkpoint: {result.model_checkpoint}")
    return 0


def _start_ray(address: str | None, num_cpus: int | None = None):
    """Join the given cluster, or start an embedded local one (dashboard on 127.0.0.1)."""
    import ray

    if address:
        return ray.init(address=address)
    return ray.init(address="local", num_cpus=num_cpus or max(6, os.cpu_count() or 1), include_dashboard=True,
                    dashboard_host="127.0.0.1")


def deploy(checkpoint_dir: str, port: int, num_shards: int, use_gpu: bool = False, grpc_port: int = 9000,
           elastic: dict | None = None, cuda_graphs: str = "all") -> str:
    """Start (or update) the moray Serve application; returns the HTTP endpoint.
    elastic: `cluster.elastic` settings (failover, rebalancing, shard autoscaling per replica).
    cuda_graphs: where decode steps replay as CUDA graphs on GPUs (all, router, none)."""
    from ray import serve

    from serve.app import GRPC_SERVICER, build_app

    serve.start(http_options={"host": "127.0.0.1", "port": port},
                grpc_options={"port": grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]})
    serve.run(build_app({"checkpoint": checkpoint_dir, "num_shards": num_shards, "use_gpu": use_gpu,
                         "elastic": elastic, "cuda_graphs": cuda_graphs}), name="moray", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def _wait_forever() -> None:
    import signal
    import time

    # Ray Train's fit() leaves its own SIGINT handler installed (it asks the finished run's
    # controller to abort and swallows the signal), so after quickstart's training Ctrl-C
    # would not stop serving: put Python's back
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        print("serving; press Ctrl-C to stop", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopped")


def cmd_serve(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from cluster.config import load_cluster_config
    from model.checkpoint import load_config as load_checkpoint_config
    from model.hf import as_moray_checkpoint

    args.checkpoint = str(as_moray_checkpoint(args.checkpoint))
    name = load_checkpoint_config(args.checkpoint).name  # a bad checkpoint fails here, with one line
    cluster_cfg = load_cluster_config(args.overrides)  # and a bad cluster.* override here
    context = _start_ray(args.address)
    endpoint = deploy(str(Path(args.checkpoint).resolve()), args.port, args.num_shards, args.use_gpu, args.grpc_port,
                      asdict(cluster_cfg.elastic), args.cuda_graphs)
    print(f"model {name!r} served with {args.num_shards} expert shards")
    print(f"gRPC endpoint: 127.0.0.1:{args.grpc_port}  (serve/moray.proto, metadata application=moray)")
    print(f"OpenAI-compatible endpoint: {endpoint}/v1  (completions, chat/completions, models; health: {endpoint}/health)")
    if getattr(context, "dashboard_url", None):
        print(f"Ray dashboard: http://{context.dashboard_url}")
    if not args.no_wait:
        _wait_forever()
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from model.checkpoint import load_config as load_checkpoint_config
    from model.checkpoint import load_into, tokenizer_file
    from model.generate import SamplingParams, generate
    from model.hf import as_moray_checkpoint
    from model.tokenizer import Tokenizer
    from model.transformer import Transformer

    args.checkpoint = str(as_moray_checkpoint(args.checkpoint))
    cfg = load_checkpoint_config(args.checkpoint)
    tok_path = tokenizer_file(args.checkpoint)
    if tok_path is None:
        raise ConfigError(f"checkpoint {args.checkpoint} has no tokenizer.json")
    tok = Tokenizer.load(tok_path)
    model = Transformer(cfg, init=False).eval()
    load_into(model, args.checkpoint)
    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop_tokens=(tok.eos_id,))
    with torch.no_grad():
        out = generate(model, [tok.encode(args.prompt)], params)[0]
    print(args.prompt + tok.decode([t for t in out if t != tok.eos_id]))
    return 0


def _print_moray_dashboard(context, runs: str, data: str) -> None:
    from cluster.dashboard import DEFAULT_PORT, admin_token, port_or_free, start_in_background

    token, generated = admin_token()
    url, _ = start_in_background(context, port=port_or_free("127.0.0.1", DEFAULT_PORT), runs_dir=runs,
                                 data_dir=data, token=token)
    print(f"moray dashboard: {url}" + (f"  (admin token: {token})" if generated else ""))


def cmd_quickstart(args: argparse.Namespace) -> int:
    """Prepare the corpus, train `tiny` with 2 expert-parallel workers, serve it, ask it."""
    import requests

    from cluster.config import load_config
    from train.data import DataError, load_manifest, prepare_corpus
    from train.job import run_training

    data = Path(args.data).resolve()
    try:
        load_manifest(data)
        print(f"[1/4] corpus: {data} (already prepared)")
    except DataError:
        print(f"[1/4] preparing the corpus (this Python's standard library) in {data}")
        prepare_corpus(None, data, vocab_size=2048, progress=True)
    context = _start_ray(None)
    cfg = load_config("tiny", [f"train.data_dir={data}", f"train.storage_path={Path(args.runs).resolve()}",
                               f"train.max_steps={args.steps}", "train.num_workers=2", "train.log_every=10",
                               f"train.run_name=quickstart-{os.getpid()}"])
    print(f"[2/4] training tiny for {args.steps} steps with 2 expert-parallel workers (DeepSpeed under Ray Train)")
    result = run_training(cfg)
    if result.error or result.model_checkpoint is None:
        print(f"moray: training failed: {result.error}", file=sys.stderr)
        return 1
    print(f"      checkpoint: {result.model_checkpoint}")
    print("[3/4] serving it with 2 expert shards (Ray Serve)")
    endpoint = deploy(result.model_checkpoint, args.port, num_shards=2, grpc_port=args.grpc_port)
    print("[4/4] asking for a completion")
    prompt = "def main("
    reply = requests.post(f"{endpoint}/v1/completions", timeout=120,
                          json={"model": "tiny", "prompt": prompt, "max_tokens": 32, "temperature": 0}).json()
    print("\n" + prompt + reply["choices"][0]["text"] + "\n")
    print(f"OpenAI-compatible endpoint: {endpoint}/v1")
    print(f"Ray dashboard: http://{context.dashboard_url}")
    _print_moray_dashboard(context, args.runs, args.data)
    print(f"try: curl {endpoint}/v1/completions -H 'content-type: application/json' "
          f"-d '{{\"model\": \"tiny\", \"prompt\": \"import \", \"max_tokens\": 20}}'")
    if not args.no_wait:
        _wait_forever()
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    """The admin dashboard in the foreground, as a driver of the given (or an embedded) cluster."""
    import uvicorn

    from cluster.dashboard import admin_token, build

    token, generated = admin_token()
    context = _start_ray(args.address)
    app = build(context, runs_dir=args.runs, data_dir=args.data, app=args.app, token=token,
                protect_reads=args.protect_reads, imbalance_alert=args.imbalance_alert)
    print(f"moray dashboard: http://{args.host}:{args.port}  (Ray dashboard: http://{context.dashboard_url})")
    if generated:
        print(f"admin token (shown once; set MORAY_DASHBOARD_TOKEN to choose it): {token}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _add_dashboard_parser(commands) -> None:
    from cluster.dashboard import DEFAULT_PORT

    dash = commands.add_parser("dashboard", help="the admin dashboard: nodes, training jobs, endpoints, experts")
    dash.add_argument("--address", help="Ray cluster to show (default: an embedded local one)")
    dash.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    dash.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"HTTP port (default {DEFAULT_PORT})")
    dash.add_argument("--app", default="moray", help="Serve application of the model (default moray)")
    dash.add_argument("--runs", default="runs", help="training runs directory (default runs)")
    dash.add_argument("--data", default="data/corpus", help="corpus for jobs submitted from the dashboard")
    dash.add_argument("--protect-reads", action="store_true", help="require the admin token for every page too")
    dash.add_argument("--imbalance-alert", type=float, default=2.0,
                      help="alert when the expert load's max/mean over shards exceeds this (default 2.0)")
    dash.set_defaults(func=cmd_dashboard)
def _connect(address: str | None) -> None:
    """Join the given cluster, or the local one `moray serve` started (address "auto")."""
    import logging

    import ray

    from cluster.experts import ExpertsError

    host, _, port = (address or "").rpartition(":")
    if host and port.isdigit() and "://" not in address:  # Ray would retry a dead GCS address for minutes
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as exc:
            raise ExpertsError(f"no Ray cluster at {address}: {exc.strerror or exc}") from None
    try:
        ray.init(address=address or "auto", logging_level=logging.ERROR, log_to_driver=False)
    except ConnectionError as exc:
        raise ExpertsError(f"no Ray cluster at {address or 'auto'}: {str(exc).splitlines()[0]}") from None
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the handle's INFO lines are not the answer


def _print_event(event: dict) -> int:
    state = "done" if event["ok"] else "FAILED"
    print(f"{event['action']} {state} in {event['duration_s']:.2f} s: {event['message']}")
    print(f"  imbalance {event['before']['imbalance']:.3f} -> {event['after']['imbalance']:.3f}, "
          f"shards {len(event['before']['shard_load'])} -> {len(event['after']['shard_load'])}")
    return 0 if event["ok"] else 1


def cmd_cluster_status(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from cluster.experts import ExpertsError, experts_status

    _connect(args.address)
    nodes = [{"node_id": n["NodeID"], "alive": n["Alive"], "address": n["NodeManagerAddress"],
              "cpus": n["Resources"].get("CPU", 0), "gpus": n["Resources"].get("GPU", 0)} for n in ray.nodes()]
    apps = {name: {"status": str(app.status), "deployments": {
        d: {str(state).split(".")[-1]: n for state, n in dep.replica_states.items()}
        for d, dep in app.deployments.items()}} for name, app in serve.status().applications.items()}
    try:
        experts = experts_status(args.app)
    except ExpertsError as exc:
        experts = {"error": str(exc)}
    if args.json:
        print(json.dumps({"nodes": nodes, "applications": apps, "experts": experts}, indent=2))
        return 0
    print(f"nodes ({sum(n['alive'] for n in nodes)} alive):")
    for n in nodes:
        print(f"  {n['node_id'][:12]}  {'alive' if n['alive'] else 'DEAD '}  {n['address']:<15} "
              f"CPU {n['cpus']:g}  GPU {n['gpus']:g}")
    print("applications:")
    for name, app in apps.items():
        deployments = ", ".join(f"{d} {states}" for d, states in app["deployments"].items())
        print(f"  {name}: {app['status']}  {deployments}")
    if "error" in experts:
        print(f"experts: {experts['error']}")
        return 0
    print(f"experts of {args.app!r} (replica {experts['replica'][:8]}, {len(experts['replicas'])} replica(s)): "
          f"{len(experts['shards'])} shards ({len(experts.get('standby', []))} standby), "
          f"imbalance {experts['imbalance']:.3f}, "
          f"controller {'on' if experts['controller']['enabled'] else 'off'}"
          f"{', FAILED: ' + experts['failure'] if experts['failure'] else ''}")
    for layer, shards in enumerate(experts["placement"]):
        held = [e for ids in shards for e in ids]
        replicated = sorted({e for e in held if held.count(e) > 1})
        print(f"  MoE layer {layer}: {len(held)} expert copies on {len(shards)} shards"
              f"{', replicated ' + str(replicated) if replicated else ''}")
    for shard, load in zip(experts["shards"], experts["shard_load"]):
        per_layer = "/".join(str(n) for n in shard["experts_per_layer"])
        print(f"  shard {shard['index']}  node {shard['node_id'][:12]}  {'alive' if shard['alive'] else 'DEAD '}  "
              f"experts per layer {per_layer}  window load {load:.0f}")
    for event in experts["events"][-5:]:
        print(f"  event {event['action']}: {'ok' if event['ok'] else 'FAILED'} {event['duration_s']:.2f} s "
              f"{event['message'][:100]}")
    return 0


def cmd_experts_rebalance(args: argparse.Namespace) -> int:
    from cluster.experts import rebalance

    _connect(args.address)
    return _print_event(rebalance(args.app))


def _read_placement(path: str) -> list:
    """A placement file: JSON or YAML, [layer][shard] -> expert ids or one [shard] -> ids."""
    from omegaconf import OmegaConf

    from cluster.experts import ExpertsError

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ExpertsError(f"placement file {path}: {exc.strerror}") from None
    try:
        data = json.loads(text) if path.endswith(".json") else OmegaConf.to_container(OmegaConf.create(text))
    except Exception as exc:
        raise ExpertsError(f"placement file {path}: not valid JSON/YAML: {str(exc).splitlines()[0]}") from None
    if isinstance(data, dict):
        data = data.get("placement")
    if not isinstance(data, list):
        raise ExpertsError(f"placement file {path}: expected a list ([layer][shard] -> expert ids) "
                           f"or a mapping with a 'placement' list")
    return data


def cmd_experts_place(args: argparse.Namespace) -> int:
    from actors.placement import ExpertPlacement
    from cluster.experts import apply_placement, experts_status

    lists = _read_placement(args.file)
    _connect(args.address)
    load = experts_status(args.app)["load"]
    ExpertPlacement.from_lists(lists, len(load), len(load[0]))  # a broken map fails here, naming the expert
    return _print_event(apply_placement(args.app, lists))


def cmd_shards_scale(args: argparse.Namespace) -> int:
    from cluster.experts import ExpertsError, scale_shards

    if args.n < 1:
        raise ExpertsError(f"number of shards must be >= 1, got {args.n}")
    _connect(args.address)
    return _print_event(scale_shards(args.app, args.n))


def cmd_shards_drain(args: argparse.Namespace) -> int:
    from cluster.experts import drain_node

    _connect(args.address)
    return _print_event(drain_node(args.app, args.node_id))


def _admin_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="Ray cluster (default: auto, the local one `moray serve` started)")
    parser.add_argument("--app", default="moray", help="Serve application name (default: moray)")


def build_parser() -> argparse.ArgumentParser:
    from cluster.config import preset_names

    parser = argparse.ArgumentParser(prog="moray", description="Train and serve Mixture-of-Experts models on Ray.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="prepare training data").add_subparsers(dest="data_command", required=True)
    prep = data.add_parser("prepare", help="train a BPE tokenizer and write Parquet token shards")
    prep.add_argument("--input", action="append", metavar="PATH",
                      help="text file or directory (repeatable); default: this Python's standard-library sources")
    prep.add_argument("--out", default="data/corpus", help="output directory (default: data/corpus)")
    prep.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary size (default: 2048)")
    prep.add_argument("--tokenizer", metavar="PATH",
                      help="use this tokenizer instead of training one: a tokenizer.json, a moray checkpoint or a "
                      "Hugging Face model dir (for training from its weights)")
    prep.add_argument("--quiet", action="store_true", help="no progress bars")
    prep.set_defaults(func=cmd_data_prepare)

    model = commands.add_parser("model", help="inspect models").add_subparsers(dest="model_command", required=True)
    info = model.add_parser("info", help="parameters, activated parameters, KV-cache size per token")
    info.add_argument("config", metavar="CONFIG_OR_PRESET", help=f"YAML file or preset ({', '.join(preset_names())})")
    info.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. model.moe.top_k=4")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=cmd_model_info)
    ckpt = commands.add_parser("checkpoint", help="convert checkpoints").add_subparsers(
        dest="checkpoint_command", required=True)
    imp = ckpt.add_parser("import-hf", help="Hugging Face DeepSeek-V2/V3 or Mixtral dir -> moray checkpoint")
    imp.add_argument("hf_dir", metavar="HF_DIR", help="dir with config.json, *.safetensors (+ index), tokenizer files")
    imp.add_argument("out_dir", metavar="OUT_DIR", help="moray checkpoint to write (must not exist, or be one)")
    imp.add_argument("--dtype", default="keep", choices=["keep", "float32", "bfloat16", "float16"],
                     help="cast weights (default: keep the source's; fp8 weights become bfloat16)")
    imp.add_argument("--quiet", action="store_true", help="no progress bar")
    imp.set_defaults(func=cmd_checkpoint_import_hf)
    exp = ckpt.add_parser("export-hf", help="moray checkpoint -> Hugging Face dir that transformers loads")
    exp.add_argument("checkpoint", metavar="CKPT")
    exp.add_argument("out_dir", metavar="OUT_DIR", help="dir to write (must not exist, or be empty)")
    exp.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard (default 5)")
    exp.add_argument("--quiet", action="store_true", help="no progress bar")
    exp.set_defaults(func=cmd_checkpoint_export_hf)

    train = commands.add_parser("train", help="train with DeepSpeed under Ray Train (local cluster, or --address)")
    train.add_argument("config", metavar="CONFIG_OR_PRESET", help="YAML file or preset")
    train.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. train.max_steps=50")
    train.add_argument("--address", help="submit as a Ray job to this cluster (http://host:8265) and follow it")
    train.add_argument("--init-from", help="start from a moray model checkpoint or a Hugging Face model dir "
                       "(its model config replaces the preset's)")
    train.add_argument("--resume-from", help="continue from a training checkpoint (any number of workers)")
    train.set_defaults(func=cmd_train)

    serve_cmd = commands.add_parser("serve", help="serve a checkpoint: OpenAI-compatible HTTP on Ray Serve")
    serve_cmd.add_argument("checkpoint", help="moray model checkpoint directory (a training run's model/) or a "
                           "Hugging Face DeepSeek-V2/V3/Mixtral dir (converted once into $MORAY_HF_CACHE)")
    serve_cmd.add_argument("overrides", nargs="*", help="cluster config overrides, e.g. cluster.elastic.rebalance=true "
                           "cluster.elastic.threshold=1.2 cluster.elastic.redundant_experts=4")
    serve_cmd.add_argument("--address", help="Ray cluster to deploy to (default: an embedded local one)")
    serve_cmd.add_argument("--port", type=int, default=8000, help="HTTP port on 127.0.0.1 (default 8000)")
    serve_cmd.add_argument("--grpc-port", type=int, default=9000, help="gRPC port (default 9000)")
    serve_cmd.add_argument("--num-shards", type=int, default=2, help="expert shards per replica (default 2)")
    serve_cmd.add_argument("--use-gpu", action="store_true", help="router and shards on GPUs, NCCL between them")
    serve_cmd.add_argument("--cuda-graphs", choices=CUDA_GRAPH_MODES, default="all",
                           help="GPU: where decode steps replay as CUDA graphs, router and shards (all, the "
                                "default), the router only, or none (eager; a shard dying mid-step then fails "
                                "over within the collective timeout)")
    serve_cmd.add_argument("--no-wait", action="store_true", help="return after deploying")
    serve_cmd.set_defaults(func=cmd_serve)

    gen = commands.add_parser("generate", help="one completion from a checkpoint, in this process")
    gen.add_argument("checkpoint")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int)
    gen.set_defaults(func=cmd_generate)

    quick = commands.add_parser("quickstart", help="prepare data, train tiny, serve it, ask it (local Ray cluster)")
    quick.add_argument("--data", default="data/corpus")
    quick.add_argument("--runs", default="runs")
    quick.add_argument("--steps", type=int, default=150)
    quick.add_argument("--port", type=int, default=8000)
    quick.add_argument("--grpc-port", type=int, default=9000)
    quick.add_argument("--no-wait", action="store_true", help="exit after the first completion")
    quick.set_defaults(func=cmd_quickstart)
    _add_dashboard_parser(commands)

    cluster = commands.add_parser("cluster", help="the running cluster").add_subparsers(dest="cluster_command",
                                                                                      required=True)
    status = cluster.add_parser("status", help="nodes, applications, replicas, shards, placement, imbalance")
    _admin_flags(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_cluster_status)

    experts = commands.add_parser("experts", help="expert placement of a served model").add_subparsers(
        dest="experts_command", required=True)
    rebalance = experts.add_parser("rebalance", help="re-place experts by recent load (replicating hot ones)")
    _admin_flags(rebalance)
    rebalance.set_defaults(func=cmd_experts_rebalance)
    place = experts.add_parser("place", help="apply an explicit placement from a JSON/YAML file")
    place.add_argument("file", help="[layer][shard] -> expert ids, or one [shard] -> ids for every layer")
    _admin_flags(place)
    place.set_defaults(func=cmd_experts_place)

    shards = commands.add_parser("shards", help="expert shards of a served model").add_subparsers(
        dest="shards_command", required=True)
    scale = shards.add_parser("scale", help="scale every replica to N expert shards while serving")
    scale.add_argument("n", type=int, metavar="N")
    _admin_flags(scale)
    scale.set_defaults(func=cmd_shards_scale)
    drain = shards.add_parser("drain", help="move every shard on a node to other nodes while serving")
    drain.add_argument("node_id", help="node id (as `moray cluster status --json` lists it)")
    _admin_flags(drain)
    drain.set_defaults(func=cmd_shards_drain)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as exc:
        print(f"moray: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

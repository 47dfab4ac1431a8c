"""The ``qolora`` command: ``init``, ``train``, ``export``, ``generate``, ``chat``, ``eval``, ``compare``,
``sweep``, ``plan``, ``prepare-demo``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence

from . import __version__
from ._io import ExternalToolError, RunStopped
from .choices import GGUF_TYPES, INIT_SOURCES, INITS, OPTIMIZERS


def _init(args: argparse.Namespace) -> int:
    from peft import LoraConfig

    from .adapters import get_qolora_model, save_adapter
    from .quant import load_base

    t0 = time.perf_counter()
    model = load_base(args.model, quant_type="none" if args.no_quant else "nf4", compute_dtype=args.compute_dtype)
    targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
    cfg = LoraConfig(
        r=args.r,
        lora_alpha=args.alpha if args.alpha is not None else args.r,
        lora_dropout=args.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    peft_model = get_qolora_model(
        model, cfg, init_source=args.init_source, init=args.init, init_iters=args.init_iters, svd_niter=args.svd_niter
    )
    report = peft_model.qolora_states["default"].report
    if report is not None:
        print(report)
    out = save_adapter(peft_model, args.out)
    print(f"adapter written to {out} in {time.perf_counter() - t0:.1f} s")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .training import train

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        from .config import commented_yaml

        print(commented_yaml(cfg), end="")
        return 0
    out = train(cfg, resume=args.resume)
    from .distributed import world
    from .files import METRICS_FILE, PLOT_FILE

    if world().is_main:
        print(f"adapter written to {out}; metrics in {out.parent / METRICS_FILE}, plot in {out.parent / PLOT_FILE}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export_gguf, export_lora, export_merged

    common = {"overwrite": args.overwrite, "checkpoint": args.checkpoint}
    if args.kind == "gguf":
        result = export_gguf(
            args.adapter_dir,
            args.out_dir,
            type=args.type,
            mode=args.mode,
            llama_cpp=args.llama_cpp,
            name=args.name,
            **common,
        )
    elif args.kind == "merged":
        shard = int(args.max_shard_gb * 2**30)
        result = export_merged(
            args.adapter_dir, args.out_dir, mode=args.mode, dtype=args.dtype, max_shard_bytes=shard, **common
        )
    else:
        result = export_lora(args.adapter_dir, args.out_dir, measure_gap=args.gap, **common)
    print(result)
    return 0


def _gen_kw(args: argparse.Namespace) -> dict:
    return {
        "max_new_tokens": args.max_new_tokens,
        "greedy": args.greedy,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
    }


def _generate(args: argparse.Namespace) -> int:
    from .generate import generate, load_chat_model

    cm = load_chat_model(args.model, args.template)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if args.system:
        prompt = [{"role": "system", "content": args.system}, {"role": "user", "content": prompt}]
    generate(cm, prompt, stream=sys.stdout, **_gen_kw(args))
    return 0


def _chat(args: argparse.Namespace) -> int:
    from .generate import chat_loop, load_chat_model

    chat_loop(load_chat_model(args.model, args.template), system=args.system, **_gen_kw(args))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from .training.evaluate import evaluate, format_table

    result = evaluate(args.adapter_dir, args.data, args.source_data, batch_size=args.batch_size, max_rows=args.max_rows)
    print(format_table(result))
    if args.out:
        from pathlib import Path

        from ._io import write_json_atomic

        write_json_atomic(Path(args.out), result)
        print(f"wrote {args.out}")
    else:
        print(json.dumps(result))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .config import load_config
    from .training.compare import compare, format_summary

    cfg = load_config(args.config, args.overrides)
    ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else None
    summary = compare(cfg, args.inits.split(","), ranks, args.out, args.target_loss)
    print(format_summary(summary))
    print(f"wrote {args.out}/compare.json and {args.out}/compare.png")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from .config import load_config
    from .training.sweep import format_summary, parse_list, sweep

    cfg = load_config(args.config, args.overrides)
    summary = sweep(
        cfg,
        parse_list(args.lrs, float, "--lrs"),
        args.inits.split(",") if args.inits else None,
        parse_list(args.ranks, int, "--ranks") if args.ranks else None,
        parse_list(args.seeds, int, "--seeds") if args.seeds else None,
        args.steps,
        args.out,
    )
    print(format_summary(summary, cfg))
    print(f"wrote {args.out}/sweep.json and {args.out}/sweep.png")
    return 0


def _plan(args: argparse.Namespace) -> int:
    import json

    from .plan import plan

    p = plan(
        args.model,
        args.seq_len,
        args.batch_size,
        args.rank,
        args.gpu_memory,
        optimizer=args.optimizer,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        chunked_ce=not args.no_chunked_ce,
        offload=args.offload_activations,
        gpus=args.gpus,
        fsdp=args.fsdp,
        fsdp_offload=args.offload,
    )
    print(json.dumps(p.to_json()) if args.json else p)
    return 0


def _prepare_demo(args: argparse.Namespace) -> int:
    from .demo import prepare_demo

    paths = prepare_demo(args.out)
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qolora", description="QOLoRA: exact OLoRA adapters on a 4-bit NF4 base.")
    p.add_argument("--version", action="version", version=f"qolora {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("init", help="load a model in 4-bit, OLoRA-initialize it, save the adapter dir")
    q.add_argument("model", help="local model folder (or a hub id in the local cache)")
    q.add_argument("out", help="adapter dir to write")
    q.add_argument("--r", type=int, default=16, help="rank (default 16)")
    q.add_argument("--alpha", type=float, default=None, help="lora_alpha (default: r, so scale 1)")
    q.add_argument("--dropout", type=float, default=0.0)
    q.add_argument("--target-modules", default="all-linear", help="'all-linear' or comma-separated names")
    q.add_argument("--init", choices=INITS, default="olora")
    q.add_argument("--init-iters", type=int, default=None, help="olora / loftq: quantization rounds T (default 1)")
    q.add_argument("--svd-niter", type=int, default=None, help="pissa: randomized SVD power iterations")
    q.add_argument("--init-source", choices=INIT_SOURCES, default="auto")
    q.add_argument("--compute-dtype", default="auto", help="auto, float32, bfloat16 or float16")
    q.add_argument("--no-quant", action="store_true", help="keep the base unquantized")
    q.set_defaults(func=_init)
    t = sub.add_parser("train", help="fine-tune from a YAML config")
    t.add_argument("config", help="YAML config (see examples/sft/demo.yaml)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-4")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    t.add_argument(
        "--print-config", action="store_true", help="print the resolved config with each key's help; no training"
    )
    t.set_defaults(func=_train)
    e = sub.add_parser("export", help="merged 16-bit model, portable LoRA for the original base, or GGUF")
    e.add_argument("kind", choices=["merged", "lora", "gguf"])
    e.add_argument("adapter_dir")
    e.add_argument("out_dir", help="output folder (merged, lora) or .gguf file (gguf)")
    e.add_argument(
        "--mode", choices=["trained", "original"], default="trained", help="merged, gguf: which model to write"
    )
    e.add_argument("--type", choices=GGUF_TYPES, default="f16", help="gguf: tensor type")
    e.add_argument("--llama-cpp", default=None, help="gguf: llama.cpp folder with convert_hf_to_gguf.py")
    e.add_argument("--name", default=None, help="gguf: general.name (default: '<base> QOLoRA')")
    e.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16", help="merged: output dtype")
    e.add_argument("--max-shard-gb", type=float, default=2.0, help="merged: output shard size")
    e.add_argument("--checkpoint", default=None, help="base checkpoint folder, if it moved")
    e.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")
    e.add_argument("--gap", action="store_true", help="lora: measure the gap to the trained model")
    e.set_defaults(func=_export)
    for name, helptext in (
        ("generate", "one reply to --prompt (or stdin), streamed: for scripts"),
        ("chat", "interactive chat, streamed; reads turns from stdin"),
    ):
        g = sub.add_parser(name, help=helptext)
        g.add_argument("model", help="an adapter dir (the exact QOLoRA model) or a merged model folder")
        if name == "generate":
            g.add_argument("--prompt", default=None, help="the prompt (default: read stdin)")
        g.add_argument("--system", default=None, help="a system message")
        g.add_argument("--template", choices=["auto", "chat", "plain"], default="auto", help="default: as trained")
        g.add_argument("--max-new-tokens", type=int, default=128)
        g.add_argument("--greedy", action="store_true", help="greedy decoding (default: sampling)")
        g.add_argument("--temperature", type=float, default=0.7)
        g.add_argument("--top-p", type=float, default=0.9)
        g.add_argument("--seed", type=int, default=0, help="sampling seed")
        g.set_defaults(func=_generate if name == "generate" else _chat)
    v = sub.add_parser("eval", help="loss/perplexity of base and fine-tuned model; learn and forget")
    v.add_argument("adapter_dir")
    v.add_argument("--data", required=True, help="target-domain eval data (same formats as training)")
    v.add_argument("--source-data", default=None, help="source-domain data, for forgetting")
    v.add_argument("--out", default=None, help="write the result as JSON here")
    v.add_argument("--batch-size", type=int, default=8)
    v.add_argument("--max-rows", type=int, default=None)
    v.set_defaults(func=_eval)
    c = sub.add_parser("compare", help="train once per init (and rank) and compare convergence")
    c.add_argument("config")
    c.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    c.add_argument("--inits", default="olora,lora")
    c.add_argument("--ranks", default=None, help="comma-separated ranks (default: the config's)")
    c.add_argument("--out", default="runs/compare")
    c.add_argument("--target-loss", type=float, default=None, help="default: the worst run's final EMA loss")
    c.set_defaults(func=_compare)
    s = sub.add_parser("sweep", help="train per (init, rank, lr, seed); plot final loss against lr; best lr")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    s.add_argument("--lrs", default="3e-5,1e-4,3e-4,1e-3", help="comma-separated learning rates")
    s.add_argument(
        "--inits", default="olora,lora", help="comma-separated: olora, pissa, loftq, lora; -tT rounds (olora-t4)"
    )
    s.add_argument("--ranks", default=None, help="comma-separated ranks (default: the config's)")
    s.add_argument("--seeds", default=None, help="comma-separated seeds (default: the config's)")
    s.add_argument("--steps", type=int, default=None, help="steps per run (default: train.max_steps)")
    s.add_argument("--out", default="runs/sweep")
    s.set_defaults(func=_sweep)
    pl = sub.add_parser("plan", help="will a fine-tune fit on a GPU? reads config.json only")
    pl.add_argument("model", help="model folder, config.json, or cached hub id")
    pl.add_argument("--seq-len", type=int, required=True)
    pl.add_argument("--batch-size", type=int, default=1)
    pl.add_argument("--rank", type=int, default=16)
    pl.add_argument("--gpu-memory", default="24GiB")
    pl.add_argument("--optimizer", default="paged_adamw_8bit", choices=OPTIMIZERS)
    pl.add_argument("--no-gradient-checkpointing", action="store_true")
    pl.add_argument("--no-chunked-ce", action="store_true")
    pl.add_argument("--offload-activations", action="store_true")
    pl.add_argument("--gpus", type=int, default=1, help="GPUs (processes) sharing the job; --batch-size is per GPU")
    pl.add_argument("--fsdp", action="store_true", help="FSDP-QLoRA: shard the 4-bit base across the GPUs")
    pl.add_argument("--offload", action="store_true", help="with --fsdp: keep the shards and optimizer on the CPU")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=_plan)
    d = sub.add_parser("prepare-demo", help="make the offline demo model folder and data")
    d.add_argument("--out", default="demo", help="folder to write (default: demo)")
    d.set_defaults(func=_prepare_demo)
    return p


TEXT_ON_STDOUT = ("generate", "chat")  # their stdout is the model's text only: it can be piped


def _setup_logging(verbose: bool, command: str) -> None:
    """Progress and info on stdout, warnings and errors on stderr: a failed command's stderr is
    its one error line (plus any warnings). For ``generate`` and ``chat`` every log line goes to
    stderr, so that stdout carries the model's text alone."""
    root = logging.getLogger()
    if root.handlers:  # configured by the caller (or pytest): leave it
        return
    fmt = logging.Formatter("%(levelname)s %(name)s: %(message)s")
    info = sys.stderr if command in TEXT_ON_STDOUT else sys.stdout
    out, err = logging.StreamHandler(info), logging.StreamHandler(sys.stderr)
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err.setLevel(logging.WARNING)
    for h in (out, err):
        h.setFormatter(fmt)
        root.addHandler(h)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    from .distributed import configure_logging

    configure_logging(root)  # several processes: info from rank 0 only, warnings and errors name their rank


def _end_progress_bars() -> None:
    """Close the bars an exception left open, so that the error line starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def _say(line: str) -> None:
    """One line to stderr in one write: the ranks of a job share the launcher's stderr, and a line
    written in parts can interleave with another rank's (one write of <= PIPE_BUF bytes is atomic)."""
    sys.stderr.flush()
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a captured or replaced stderr
        print(line, file=sys.stderr)
        return
    os.write(fd, (line + "\n").encode("utf-8", "backslashreplace"))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose, args.command)
    # On AVX512-BF16 CPUs bitsandbytes warns at import that the kernel of its packed CPU eval
    # path is missing; QOLoRA switches that path off (qolora/quant/layout.py), so it is noise.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # transformers >= 5.25 asks the hub-kernel package about bitsandbytes' kernels and, offline, warns
    # that it skipped a trust check of a download it never makes: noise on a failed command's stderr
    logging.getLogger("kernels").setLevel(logging.ERROR)
    try:
        return int(args.func(args))
    except RunStopped as e:  # SIGTERM / SIGINT: 128 + the signal, as a shell reports a killed command
        _end_progress_bars()
        from .distributed import rank_prefix

        _say(f"qolora {args.command}: {rank_prefix()}{e}")
        return e.exit_code
    except (ValueError, OSError, ExternalToolError) as e:  # FileNotFoundError and FileExistsError are OSErrors
        _end_progress_bars()
        msg = " ".join(str(e).split())  # one line, also for libraries' multi-line messages
        from .distributed import rank_prefix

        _say(f"qolora {args.command}: error: {rank_prefix()}{msg}")
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`qolora export gguf`, checked by llama.cpp itself: the GGUF runs in llama.cpp (llama-cpp-python) and is
compared with the merged HF model it came from.

    python benchmarks/gguf_llamacpp.py ADAPTER_DIR [--types f16,q8_0] [--rows 8] [--continuations 4]

Needs llama-cpp-python (built from source: `pip install llama-cpp-python==0.3.36`, about 12 minutes on
2 cores) and the demo data (`qolora prepare-demo`). Per type it measures export + conversion time,
tokenization agreement, top-1 next-token agreement at every position of chat-rendered eval rows
(prompt and answer), the max logit difference, and greedy continuations side by side. Writes
benchmarks/results/gguf/llamacpp-<types>.json and prints the BENCHMARKS.md rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from qolora._io import write_json_atomic  # noqa: E402
from qolora.export import export_gguf, export_merged  # noqa: E402

RESULTS = Path("benchmarks/results/gguf")


def chats(path: str, n: int) -> list[list[dict[str, str]]]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()][:n]
    return [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}] for r in rows]


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("adapter")
    ap.add_argument("--types", default="f16,q8_0")
    ap.add_argument("--data", default="demo/data/eval.jsonl")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--continuations", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    import llama_cpp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    results: dict = {"adapter": args.adapter, "machine": _common.machine(), "date": _common.today(), "types": {}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        merged = export_merged(args.adapter, Path(tmp) / "merged", dtype="float32", progress=False).out_dir
        tok = AutoTokenizer.from_pretrained(merged)
        hf = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
        convs = chats(args.data, args.rows)
        texts = [tok.apply_chat_template(c, tokenize=False) for c in convs]
        prompts = [tok.apply_chat_template(c[:1], tokenize=False, add_generation_prompt=True) for c in convs]
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        ref = [hf_logits(hf, x) for x in ids]
        hf_greedy = []
        for p in prompts[: args.continuations]:
            x = tok(p, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                out = hf.generate(input_ids=x, max_new_tokens=args.new_tokens, do_sample=False)
            hf_greedy.append(out[0, x.shape[1] :].tolist())
        for kind in args.types.split(","):
            path = Path(tmp) / f"model-{kind}.gguf"
            t0 = time.perf_counter()
            res = export_gguf(args.adapter, path, type=kind, progress=False)
            wall = time.perf_counter() - t0
            llm = llama_cpp.Llama(str(path), n_ctx=1024, logits_all=True, verbose=False, n_threads=2)
            same_tok = sum(llm.tokenize(t.encode(), add_bos=False, special=True) == x for t, x in zip(texts, ids))
            agree = total = 0
            max_diff = 0.0
            for x, r in zip(ids, ref):
                llm.reset()
                llm.eval(x)
                got = torch.tensor(llm.scores[: len(x)])
                agree += int((got.argmax(-1) == r.argmax(-1)).sum())
                total += len(x)
                max_diff = max(max_diff, float((got - r).abs().max()))
            conts = []
            for p, want in zip(prompts, hf_greedy):
                x = tok(p, add_special_tokens=False)["input_ids"]
                llm.reset()
                gen = []
                for t in llm.generate(x, temp=0.0, top_k=1, reset=True):
                    if len(gen) == len(want) or t == llm.token_eos():
                        break
                    gen.append(t)
                conts.append(
                    {"prompt": p, "hf": tok.decode(want), "llama.cpp": tok.decode(gen), "same": gen == want[: len(gen)]}
                )
            results["types"][kind] = {
                "seconds": res.seconds,
                "wall_s": wall,
                "bytes": res.bytes_written,
                "tokenization_same": f"{same_tok}/{len(texts)}",
                "top1_agree": agree,
                "positions": total,
                "max_logit_diff": max_diff,
                "continuations_same": sum(c["same"] for c in conts),
                "continuations": conts,
            }
            rows.append(
                _common.row(
                    f"GGUF {kind} in llama.cpp (llama-cpp-python {llama_cpp.__version__}) vs merged HF fp32",
                    f"{same_tok}/{len(texts)}",
                    f"{agree}/{total} ({100 * agree / total:.1f}%)",
                    f"{max_diff:.3f}",
                    f"{sum(c['same'] for c in conts)}/{len(conts)}",
                    " + ".join(f"{k} {v:.1f} s" for k, v in res.seconds.items()),
                    f"`{_common.command()}`",
                    _common.machine(),
                    _common.today(),
                )
            )
            del llm
    write_json_atomic(RESULTS / f"llamacpp-{args.types.replace(',', '-')}.json", results)
    print(
        "| what | tokenization same | top-1 next token agrees | max logit diff | greedy continuations same "
        "| time | command | machine | date |"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()

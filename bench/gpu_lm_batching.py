"""Continuous batching of a GPT-2-small-shaped language model, prepared for one GPU: 64
concurrent chat jobs through the `transformers` model server against the same jobs one at a
time, in one run. Ray is not needed: the script builds `workers.server.ModelServer` itself (the
class the Ray actor wraps) and calls its `generate` from 64 threads, as 64 Celery tasks would
through Ray.

    python bench/gpu_lm_batching.py              # GPT-2-small shapes, CUDA (bf16 or fp16)
    python bench/gpu_lm_batching.py --tiny       # a tiny shape on the CPU (the kit's dry run)

The model is built from config with random weights (no hub here) and saved as a folder the
`transformers` family loads: GPT-2 small (12 layers, 768 wide, 12 heads, 1,024 positions, a
vocabulary of 50,257) with a word-level tokenizer over made-up words of the same vocabulary
size and a chat template. Every job is a chat of one user message answered with `--max-tokens`
sampled tokens (its own seed; a random model rarely says end-of-text). One at a time runs
`--alone-jobs` of the jobs (its rate does not depend on how many); concurrent runs all
`--jobs`.

Figures: tokens/s of each way and their ratio (issue #19's target on the GPU: >= 20x with 64
jobs), the largest batch the server formed, and how many of the jobs run both ways got the same
text alone and batched with the same seed (in half precision the logits of a row change with the
batch more than in fp32; docs/batching.md). Written to
bench/results/gpu-lm-batching-<device name>-<UTC time>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
SHAPES = {
    "gpt2-small": {"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024,
                   "vocab_size": 50257},
    "tiny": {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 256, "vocab_size": 1000},
}  # fmt: skip


def build_lm(path: Path, shape: dict[str, int], dtype: str) -> Path:
    """A GPT-2 of `shape` with random weights and a word-level tokenizer of its vocabulary."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>"]
    words = [f"w{i}" for i in range(shape["vocab_size"] - len(specials))]
    vocab = {w: i for i, w in enumerate(specials + words)}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=shape["n_positions"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**shape, bos_token_id=0, eos_token_id=0))
    model.to(getattr(torch, dtype)).save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return path


def chat(i: int, max_tokens: int) -> dict[str, Any]:
    words = " ".join(f"w{(i * 7 + k) % 500}" for k in range(8 + i % 9))  # 8-16 words
    return {
        "messages": [{"role": "user", "content": words}],
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "top_p": 0.95,
        "seed": 100 + i,
    }


def run(server: Any, job_id: str, params: dict[str, Any]) -> tuple[int, str]:
    from core.events import Output

    for event in server.generate(job_id, params):
        if isinstance(event, Output):
            return int(event.meta["completion_tokens"]), bytes(event.data).decode()
    raise AssertionError(f"{job_id} ended without its output")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shape on the CPU (dry run)")
    parser.add_argument("--jobs", type=int, default=64)
    parser.add_argument("--alone-jobs", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    import torch

    from workers.server import ModelServer, ServingOptions

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)  # as a Ray actor with num_cpus=1 runs
    shape_name = "tiny" if args.tiny else "gpt2-small"
    dtype = "float32" if device == "cpu" else "float16"
    folder = build_lm(
        Path(tempfile.mkdtemp(prefix="genq-gpu-lm-")) / "lm", SHAPES[shape_name], dtype
    )
    started = time.perf_counter()
    server = ModelServer("transformers", str(folder), {}, ServingOptions(idle_unload_s=None))
    load_s = time.perf_counter() - started
    n, n_alone = args.jobs, min(args.alone_jobs, args.jobs)
    jobs = [chat(i, args.max_tokens) for i in range(n)]
    run(server, "warm", jobs[0])

    start = time.perf_counter()
    alone = [run(server, f"alone-{i}", jobs[i]) for i in range(n_alone)]
    alone_s = time.perf_counter() - start
    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        together = list(pool.map(lambda i: run(server, f"batch-{i}", jobs[i]), range(n)))
    together_s = time.perf_counter() - start

    alone_tps = sum(t for t, _ in alone) / alone_s
    together_tps = sum(t for t, _ in together) / together_s
    same = sum(alone[i][1] == together[i][1] for i in range(n_alone))
    stats = server.info()["batching"]
    results = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "shape": shape_name,
        "dtype": str(server.model.model.dtype),
        "workload": f"{n} chat jobs x {args.max_tokens} tokens (one at a time: {n_alone} of"
        " them), temperature 0.8, top-p 0.95",
        "load_s": load_s,
        "alone_tokens_per_s": alone_tps,
        "together_tokens_per_s": together_tps,
        "ratio": together_tps / alone_tps,
        "same_text_alone_and_batched": f"{same} of {n_alone}",
        "server_stats": stats,
    }
    lines = [
        f"# GPT-2-shaped language-model batching on {results['device']} ({results['at']})",
        "",
        f"Shape {shape_name} ({results['dtype']}); workload: {results['workload']}.",
        "",
        "| way | tokens/s | ratio |",
        "|---|---:|---:|",
        f"| one at a time | {alone_tps:.0f} | 1.00x |",
        f"| {n} concurrent (continuous batching) | {together_tps:.0f} |"
        f" {results['ratio']:.1f}x (target on a GPU: >= 20x) |",
        "",
        f"Largest batch {stats['largest_batch_jobs']} jobs; {stats['shared_steps']} of"
        f" {stats['steps']} forward passes shared. Same text alone and batched (same seed):"
        f" {results['same_text_alone_and_batched']} jobs.",
    ]
    print("\n".join(lines))
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    tag = "cpu-tiny" if args.tiny else results["device"].replace(" ", "-").lower()
    name = f"gpu-lm-batching-{tag}-{stamp}"
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Batching a Stable-Diffusion-shaped pipeline, prepared for one H200: 1 job alone, 16
concurrent jobs through the batching model server, and the bare pipeline at batch 16, in one
run. Ray is not needed: the script builds `workers.server.ModelServer` itself (the class the Ray
actor wraps) and calls its `generate` from 16 threads, as 16 Celery tasks would through Ray.

    python bench/gpu_batching.py                 # SD-1.5 shapes, fp16, CUDA, 512x512, 25 steps
    python bench/gpu_batching.py --tiny          # tiny SD shapes on the CPU (a smoke run)

The pipeline is built from config with random weights (no hub here) and saved as a folder the
`diffusers` family loads: the SD-1.5 UNet2DConditionModel (320/640/1280/1280 channels, cross
attention 768), the SD VAE, a CLIP-L-shaped text encoder (12 layers, 768 wide, 77 tokens) with a
byte-level tokenizer, classifier-free guidance 7.5, the PNDM sampler. `--tiny` uses the test
suite's tiny SD folder (tests/support/pretrained_models.py), 32x32 images, fp32.

Figures: images/s of each way; ratios concurrent/alone (the issue's target on the H200: >= 4x)
and concurrent/bare batch (>= 90%); whether a job's PNG is byte-identical alone and in the
batch; and the smallest UNet batch from which rows come out with the same bits as in a batch
of 32 (a value for GENQ_BATCH_MIN_ROWS on that device). Written to
bench/results/gpu-batching-<device>-<UTC time>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

JOBS = 16


def byte_tokenizer(max_length: int) -> Any:
    """A CLIP tokenizer over the 256 byte symbols, no merges (no vocabulary download)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({f"{s}</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def build_sd15(path: Path) -> Path:
    """SD-1.5 shapes with random weights, saved in fp16 safetensors."""
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        cross_attention_dim=768,
        attention_head_dim=8,
    )  # the other defaults are SD-1.5's: 320/640/1280/1280, 2 layers a block
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            max_position_embeddings=77,
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
        )
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet.half(),
        vae=vae.half(),
        text_encoder=text.half(),
        tokenizer=byte_tokenizer(77),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path


def params_for(i: int, steps: int, guidance: float) -> dict[str, Any]:
    return {
        "prompt": f"fox {i}",  # short: the tiny tokenizer keeps 16 byte tokens
        "steps": steps,
        "guidance": guidance,
        "num_images": 1,
        "seed": 1000 + i,
    }


def run_job(server: Any, job_id: str, params: dict[str, Any]) -> list[bytes]:
    return [e.data for e in server.generate(job_id, params) if hasattr(e, "data")]


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def invariant_from(unet: Any, device: str, dtype: Any, sizes: list[int]) -> int | None:
    """The smallest batch (of those tried) from which every larger one gives each row the same
    bits as a batch of 32 does."""
    import torch

    cfg = unet.config
    g = torch.Generator().manual_seed(0)
    shape = (32, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    x = torch.randn(shape, generator=g).to(device, dtype)
    ctx = torch.randn(32, 77 if cfg.cross_attention_dim == 768 else 16, cfg.cross_attention_dim)
    ctx = ctx.to(device, dtype)
    t = torch.tensor(500, device=device)
    with torch.no_grad():
        full = unet(x, t, encoder_hidden_states=ctx).sample
        same = {
            b: torch.equal(unet(x[:b], t, encoder_hidden_states=ctx[:b]).sample, full[:b])
            for b in sizes
        }
    good = None
    for b in sorted(sizes, reverse=True):
        if not same[b]:
            break
        good = b
    return good


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny SD shapes on the CPU")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--min-rows", type=int, default=16, help="GENQ_BATCH_MIN_ROWS")
    parser.add_argument("--max-wait-ms", type=float, default=50.0)
    args = parser.parse_args()

    import torch
    import transformers
    from diffusers import StableDiffusionPipeline

    from workers.server import ModelServer, ServingOptions

    transformers.utils.logging.set_verbosity_error()

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    steps = args.steps or (4 if args.tiny else 25)
    guidance = 7.5
    folder = Path(tempfile.mkdtemp(prefix="genq-gpu-batching-")) / "sd"
    if args.tiny:
        from tests.support.pretrained_models import build_tiny_sd

        torch.set_num_threads(1)
        build_tiny_sd(folder)
    else:
        build_sd15(folder)

    options = ServingOptions(
        batch_max_wait_ms=args.max_wait_ms, batch_min_rows=args.min_rows, idle_unload_s=None
    )
    server = ModelServer("diffusers", str(folder), {}, options)
    print(f"loaded on {server.device} in {server.load_s:.1f} s")
    run_job(server, "warm", params_for(99, steps, guidance))

    # 1 job alone, a few times.
    repeats = 3
    synchronize()
    start = time.perf_counter()
    alone = {
        i: run_job(server, f"alone-{i}", params_for(i, steps, guidance)) for i in range(repeats)
    }
    synchronize()
    alone_ips = repeats / (time.perf_counter() - start)

    # 16 concurrent jobs through the batching server.
    results: dict[int, list[bytes]] = {}

    def job(i: int) -> None:
        results[i] = run_job(server, f"conc-{i}", params_for(i, steps, guidance))

    threads = [threading.Thread(target=job, args=(i,)) for i in range(JOBS)]
    synchronize()
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    synchronize()
    concurrent_ips = JOBS / (time.perf_counter() - start)
    stats = dict(server.info()["batching"])
    identical = all(results[i] == alone[i] for i in range(repeats))

    # The bare pipeline at batch 16 and at batch 1 (no server, no padding).
    pipe = StableDiffusionPipeline.from_pretrained(
        str(folder), dtype=dtype, use_safetensors=True, local_files_only=True
    ).to(device)
    pipe.set_progress_bar_config(disable=True)

    def bare(n: int) -> float:
        prompts = [params_for(i, steps, guidance)["prompt"] for i in range(n)]
        generators = [torch.Generator().manual_seed(1000 + i) for i in range(n)]
        synchronize()
        start = time.perf_counter()
        pipe(
            prompt=prompts,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generators,
            output_type="pil",
        )
        synchronize()
        return n / (time.perf_counter() - start)

    bare(2)  # warm-up
    bare_batch_ips = bare(JOBS)
    bare_one_ips = sum(bare(1) for _ in range(repeats)) / repeats
    invariant = invariant_from(pipe.unet, device, dtype, [1, 2, 4, 8, 12, 16, 24])

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    figures = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": name,
        "workload": (
            f"{'tiny SD shapes 32x32 fp32' if args.tiny else 'SD-1.5 shapes 512x512 fp16'}, "
            f"{steps} steps, guidance {guidance}, 1 image a job"
        ),
        "min_rows": args.min_rows,
        "max_wait_ms": args.max_wait_ms,
        "alone_images_per_s": alone_ips,
        "concurrent_images_per_s": concurrent_ips,
        "bare_batch16_images_per_s": bare_batch_ips,
        "bare_batch1_images_per_s": bare_one_ips,
        "ratio_concurrent_vs_alone": concurrent_ips / alone_ips,
        "ratio_concurrent_vs_bare_batch1": concurrent_ips / bare_one_ips,
        "ratio_concurrent_vs_bare_batch16": concurrent_ips / bare_batch_ips,
        "byte_identical_alone_and_batched": identical,
        "unet_rows_invariant_from": invariant,
        "server_batching": stats,
    }
    lines = [
        f"# Batching a diffusers pipeline on {name} ({figures['at']})",
        "",
        f"Workload: {figures['workload']}; GENQ_BATCH_MIN_ROWS={args.min_rows}, "
        f"max wait {args.max_wait_ms:g} ms.",
        "",
        "| way | images/s | ratio |",
        "|---|---:|---:|",
        f"| 1 job alone through the server | {alone_ips:.3f} | 1.00x (baseline) |",
        f"| {JOBS} concurrent jobs through the server | {concurrent_ips:.3f} | "
        f"{figures['ratio_concurrent_vs_alone']:.2f}x alone (target >= 4x on the H200) |",
        f"| bare pipeline, batch {JOBS} | {bare_batch_ips:.3f} | server = "
        f"{100 * figures['ratio_concurrent_vs_bare_batch16']:.0f}% of it (target >= 90%) |",
        f"| bare pipeline, batch 1 (no padding) | {bare_one_ips:.3f} | server concurrent = "
        f"{figures['ratio_concurrent_vs_bare_batch1']:.2f}x it |",
        "",
        f"Batches formed: {stats['batches']} (largest {stats['largest_batch_jobs']} jobs); "
        f"alone and batched PNGs byte-identical: {identical}; UNet rows bit-identical to a batch "
        f"of 32 from batch {invariant} on.",
    ]
    print("\n".join(lines))
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    tag = "cpu-tiny" if args.tiny else name.replace(" ", "-").lower()
    (out / f"gpu-batching-{tag}-{stamp}.json").write_text(json.dumps(figures, indent=2))
    (out / f"gpu-batching-{tag}-{stamp}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

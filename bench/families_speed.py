"""Speed of every family's model code, called directly (no Ray, no queue): training
samples/s (tokens/s for charlm and the transformers LoRA) and generation images/s (tokens/s for
the language models), on CUDA when there is one, else on the CPU. The one prepared script for a
GPU machine.

    .venv/bin/python bench/families_speed.py [--preset default] [--train-steps 200] [--images 64]
    .venv/bin/python bench/families_speed.py --tiny      # every family in seconds on a CPU

Training runs `--train-steps` steps of the preset with the family's default batch size and
reports the rate of the last metric window (after warm-up); generation draws `--images` images
of one class (ddpm: 50 DDIM steps) or `--tokens` bytes of text, timed after one warm-up call.

The pretrained families have no preset: the script builds their folders from config with
random weights (speed does not depend on the values) and loads them with the workers' own
loading code. `diffusers`: a Stable-Diffusion-1.5-shaped pipeline (860M-parameter UNet, CLIP
ViT-L text encoder, the SD VAE; fp16 on CUDA), `--sd-images` images of 512x512 in batches of
`--sd-batch` with `--sd-steps` DPM++ 2M steps. `transformers`: a GPT-2-small-shaped LM (12
layers, 768 wide, a byte-level BPE trained on `pydocs`; bf16 on CUDA), `--tokens` tokens
generated, and a LoRA fine-tune on `pydocs` (seq_len 512, batch 8). `--tiny` uses the test
suite's tiny folders, the tiny presets and a few steps instead.
Figures are printed and written to bench/results/families-speed-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import write_result  # noqa: E402
from core.events import Metric, ModelSaved, Output, TextDelta  # noqa: E402
from workers.families.base import DatasetRef, RunContext, TrainContext  # noqa: E402
from workers.registry import get_family  # noqa: E402

DATASETS = {
    "ddpm": DatasetRef("digits", "images", None),
    "gan": DatasetRef("digits", "images", None),
    "vae": DatasetRef("digits", "images", None),
    "charlm": DatasetRef("pydocs", "text", None),
}


def run(family: str, args: argparse.Namespace, root: Path, device: str) -> dict:
    impl = get_family(family).load_implementation()
    ctx = TrainContext(
        job_id=family,
        device=device,
        dataset=DATASETS[family],
        checkpoint_dir=root / family / "checkpoints",
        model_dir=root / family / "model",
        model_dir_rel=f"{family}/model",
    )
    params = {"preset": args.preset, "steps": args.train_steps, "checkpoint_every": 10**6}
    rate_key = "tokens_per_s" if family == "charlm" else "samples_per_s"
    rate, saved = 0.0, None
    for event in impl.train(params, ctx):
        if isinstance(event, Metric) and rate_key in event.values:
            rate = event.values[rate_key]
        if isinstance(event, ModelSaved):
            saved = event
    assert saved is not None
    model = impl.load(ctx.model_dir, saved.config, device)
    if family == "charlm":
        gen = {"prompt": "Return the ", "max_tokens": args.tokens, "seed": 0}
    else:
        gen = {"label": 1, "num_images": args.images, "seed": 0}
        if family == "ddpm":
            gen |= {"steps": 50, "sampler": "ddim"}
    list(
        model.generate(
            {**gen, **({"max_tokens": 8} if family == "charlm" else {})}, RunContext("w", device)
        )
    )
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    made = 0
    for event in model.generate(gen, RunContext("g", device)):
        if family == "charlm" and isinstance(event, TextDelta):
            made += 1
        if family != "charlm" and isinstance(event, Output):
            made += 1
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    unit = "tokens_per_s" if family == "charlm" else "images_per_s"
    return {f"train_{rate_key}": rate, f"generate_{unit}": made / seconds}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_diffusers(args: argparse.Namespace, root: Path, device: str) -> dict:
    from bench.pretrained_shapes import build_sd15
    from tests.support.pretrained_models import build_tiny_sd
    from workers.families import sd_pipeline

    folder = root / "sd"
    started = time.perf_counter()
    build_tiny_sd(folder) if args.tiny else build_sd15(folder)
    build_s = time.perf_counter() - started
    started = time.perf_counter()
    model = sd_pipeline.load(folder, {}, device)
    load_s = time.perf_counter() - started
    size = 32 if args.tiny else 512
    params = {
        "prompt": "a watercolour painting of a fox in the snow",
        "negative_prompt": "blurry",
        "steps": args.sd_steps,
        "scheduler": "dpm++_2m",
        "width": size,
        "height": size,
        "num_images": args.sd_batch,
        "seed": 0,
    }
    list(model.generate({**params, "steps": 2, "num_images": 1}, RunContext("w", device)))
    _sync(device)
    made, started = 0, time.perf_counter()
    for call in range(max(1, args.sd_images // args.sd_batch)):
        for event in model.generate({**params, "seed": call}, RunContext("g", device)):
            made += isinstance(event, Output)
    _sync(device)
    seconds = time.perf_counter() - started
    return {
        "build_s": round(build_s, 2),
        "load_s": round(load_s, 2),
        "size_px": size,
        "steps": args.sd_steps,
        "batch": args.sd_batch,
        "generate_images_per_s": made / seconds,
        "generate_steps_per_s": made * args.sd_steps / seconds,
    }


def run_transformers(args: argparse.Namespace, root: Path, device: str) -> dict:
    from bench.pretrained_shapes import build_gpt2_small
    from tests.support.pretrained_models import build_tiny_lm
    from workers.families import causal_lm

    folder = root / "lm"
    build_tiny_lm(folder) if args.tiny else build_gpt2_small(folder)
    model = causal_lm.load(folder, {}, device)
    gen = {"prompt": "Return the ", "max_tokens": args.tokens, "seed": 0, "temperature": 0.8}
    list(model.generate({**gen, "max_tokens": 8}, RunContext("w", device)))
    _sync(device)
    started = time.perf_counter()
    made = 0
    for event in model.generate(gen, RunContext("g", device)):
        if isinstance(event, Output):
            made = event.meta["completion_tokens"]
    _sync(device)
    generate_rate = made / (time.perf_counter() - started)
    del model
    ctx = TrainContext(
        job_id="lora",
        device=device,
        dataset=DatasetRef("pydocs", "text", None),
        checkpoint_dir=root / "lora" / "checkpoints",
        model_dir=root / "lora" / "model",
        model_dir_rel="lora/model",
        parent_model_dir=folder,
    )
    params = {
        "steps": args.train_steps,
        "batch_size": 4 if args.tiny else 8,
        "seq_len": 32 if args.tiny else 512,
        "checkpoint_every": 10**6,
    }
    rate = 0.0
    for event in causal_lm.train(params, ctx):
        if isinstance(event, Metric) and "tokens_per_s" in event.values:
            rate = event.values["tokens_per_s"]
    return {
        "generate_tokens_per_s": generate_rate,
        "lora_train_tokens_per_s": rate,
        "lora": {k: v for k, v in params.items() if k != "checkpoint_every"},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--families", default="ddpm,gan,vae,charlm,diffusers,transformers")
    parser.add_argument("--preset", default="default", choices=["tiny", "default"])
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--sd-images", type=int, default=16)
    parser.add_argument("--sd-batch", type=int, default=4)
    parser.add_argument("--sd-steps", type=int, default=25)
    parser.add_argument(
        "--tiny", action="store_true", help="tiny presets and folders, a few steps (CPU check)"
    )
    args = parser.parse_args()
    if args.tiny:
        args.preset, args.train_steps, args.images, args.tokens = "tiny", 20, 4, 32
        args.sd_images, args.sd_batch, args.sd_steps = 2, 1, 3
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    report: dict = {"device": name, "preset": args.preset, "train_steps": args.train_steps}
    runners = {"diffusers": run_diffusers, "transformers": run_transformers}
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            if family in runners:
                report[family] = runners[family](args, Path(tmp), device)
            else:
                report[family] = run(family, args, Path(tmp), device)
            print(family, report[family], flush=True)
    write_result("families-speed-tiny" if args.tiny else "families-speed", report)


if __name__ == "__main__":
    main()

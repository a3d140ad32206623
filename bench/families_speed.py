"""Speed of every trainable family's model code, called directly (no Ray, no queue): training
samples/s (tokens/s for charlm) and generation images/s (tokens/s for charlm), on CUDA when
there is one, else on the CPU. The one prepared script for a GPU machine.

    .venv/bin/python bench/families_speed.py [--preset default] [--train-steps 200] [--images 64]

Training runs `--train-steps` steps of the preset with the family's default batch size and
reports the rate of the last metric window (after warm-up); generation draws `--images` images
of one class (ddpm: 50 DDIM steps) or `--tokens` bytes of text, timed after one warm-up call.
Figures are printed and written to bench/results/families-speed-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--families", default="ddpm,gan,vae,charlm")
    parser.add_argument("--preset", default="default", choices=["tiny", "default"])
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    report: dict = {"device": name, "preset": args.preset, "train_steps": args.train_steps}
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            report[family] = run(family, args, Path(tmp), device)
            print(family, report[family], flush=True)
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%S")
    path = ROOT / "bench" / "results" / f"families-speed-{stamp}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"written to {path}")


if __name__ == "__main__":
    main()

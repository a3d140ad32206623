"""What users will see: train `ddpm`, `gan` and `vae` on `digits` and `charlm` on `pydocs`
with their default parameters (on the CPU unless CUDA is there), then measure the results.

    .venv/bin/python bench/quality.py [--families ddpm,gan,vae,charlm] [--steps N] [--per-class 50]

Image families: a classifier (scikit-learn SVC) is trained on 80% of the real digits, at the
16x16 size the models draw, and checked on the other 20%; each model then draws `per-class`
images of every digit, and the accuracy of the classifier on them (the share of samples
recognised as the digit that was asked for) is reported per family, with a sample grid
written to bench/results/quality-<family>.png. `charlm`: bits per character on the held-out
last 5% of the corpus, against a unigram (byte-frequency) model fitted on the training part.
`--steps` overrides every family's default step count (to fit a short run; the JSON records
it). The workers' model code is called directly, without Ray. Results are printed and written
to bench/results/quality-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.svm import SVC  # noqa: E402

from core.events import Metric, ModelSaved, Output  # noqa: E402
from workers.datasets import load_digits, load_text  # noqa: E402
from workers.families import charlm  # noqa: E402
from workers.families.base import DatasetRef, RunContext, TrainContext  # noqa: E402
from workers.families.pictures import grid_png  # noqa: E402
from workers.registry import get_family  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def digit_classifier() -> tuple[SVC, float]:
    data = load_digits(16)
    x = data.images.reshape(len(data.images), -1).numpy()
    y = data.labels.numpy()
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0)
    clf = SVC(gamma="scale").fit(x_train, y_train)
    return clf, float(clf.score(x_test, y_test))


def train(family: str, dataset: DatasetRef, params: dict, root: Path, device: str):
    ctx = TrainContext(
        job_id=family,
        device=device,
        dataset=dataset,
        checkpoint_dir=root / "checkpoints" / family,
        model_dir=root / "models" / family,
        model_dir_rel=f"models/{family}",
    )
    impl = get_family(family).load_implementation()
    started = time.perf_counter()
    metrics: dict[str, float] = {}
    saved = None
    for event in impl.train(params, ctx):
        if isinstance(event, Metric):
            metrics.update(event.values)
            if event.step % 200 == 0:
                print(f"  {family} step {event.step}: {event.values}", flush=True)
        if isinstance(event, ModelSaved):
            saved = event
    assert saved is not None
    seconds = time.perf_counter() - started
    return impl.load(ctx.model_dir, saved.config, device), seconds, metrics


def images_of(model, family: str, label: int, count: int) -> torch.Tensor:
    """(count, 1, 16, 16) in [-1, 1], decoded back from the PNG outputs users get."""
    import io

    from PIL import Image

    params: dict = {"label": label, "num_images": count, "seed": 1000 + label}
    if family == "ddpm":
        params["steps"] = 50
    out = []
    for event in model.generate(params, RunContext(f"{family}-{label}", model_device(model))):
        if isinstance(event, Output):
            pixels = np.asarray(Image.open(io.BytesIO(event.data)), dtype=np.float32)
            out.append(torch.from_numpy(pixels / 127.5 - 1.0).unsqueeze(0))
    return torch.stack(out)


def model_device(model) -> str:
    return str(getattr(model, "device", "cpu"))


def image_family(
    family: str, steps: int | None, per_class: int, clf: SVC, root: Path, device: str
) -> dict:
    params: dict = {"seed": 0}
    if steps is not None:
        params["steps"] = steps
    model, seconds, metrics = train(
        family, DatasetRef("digits", "images", None), params, root, device
    )
    correct, total, grid = 0, 0, []
    per_label = {}
    for label in range(10):
        images = images_of(model, family, label, per_class)
        predicted = clf.predict(images.reshape(len(images), -1).numpy())
        hits = int((predicted == label).sum())
        per_label[str(label)] = hits / len(images)
        correct, total = correct + hits, total + len(images)
        grid.append(images[:8])
    # Rows are digits 0-9, eight samples each.
    (RESULTS / f"quality-{family}.png").write_bytes(grid_png(torch.cat(grid), columns=8))
    steps_run = steps if steps is not None else get_family(family).train_params().steps
    return {
        "steps": steps_run,
        "train_seconds": round(seconds, 1),
        "accuracy": correct / total,
        "accuracy_per_label": per_label,
        "last_metrics": metrics,
    }


def unigram_bits(train: bytes, held_out: bytes) -> float:
    counts = np.bincount(np.frombuffer(train, dtype=np.uint8), minlength=256) + 1.0  # Laplace
    probs = counts / counts.sum()
    test = np.frombuffer(held_out, dtype=np.uint8)
    return float(-np.log2(probs[test]).mean())


def charlm_quality(steps: int | None, root: Path, device: str) -> dict:
    params: dict = {"seed": 0}
    if steps is not None:
        params["steps"] = steps
    model, seconds, metrics = train(
        "charlm", DatasetRef("pydocs", "text", None), params, root, device
    )
    text = load_text(None)
    train_part, held_out = charlm.split(text, model.config["block_size"])
    # The model's held-out figure over many more windows than training's quick check.
    lm = model.model
    gen = torch.Generator().manual_seed(1)
    losses = []
    with torch.no_grad():
        for _ in range(64):
            x, y = charlm.batch(held_out, 16, lm.block_size, gen)
            logits = lm(x.to(model.device))
            losses.append(
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, 256), y.to(model.device).reshape(-1)
                ).item()
            )
    sample = "".join(
        e.text
        for e in model.generate(
            {"prompt": "Return the ", "max_tokens": 200, "seed": 0, "temperature": 0.8},
            RunContext("s", device),
        )
        if hasattr(e, "index")
    )
    steps_run = steps if steps is not None else get_family("charlm").train_params().steps
    return {
        "steps": steps_run,
        "train_seconds": round(seconds, 1),
        "held_out_bits_per_char": sum(losses) / len(losses) / math.log(2),
        "unigram_bits_per_char": unigram_bits(
            bytes(train_part.to(torch.uint8).tolist()), bytes(held_out.to(torch.uint8).tolist())
        ),
        "sample": "Return the " + sample,
        "last_metrics": metrics,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--families", default="ddpm,gan,vae,charlm")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--per-class", type=int, default=50)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    RESULTS.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": device, "torch_threads": torch.get_num_threads(), "families": {}}
    clf, real_accuracy = digit_classifier()
    report["classifier_accuracy_on_real_digits"] = real_accuracy
    print(f"classifier accuracy on held-out real digits: {real_accuracy:.3f}", flush=True)
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%S")
    path = RESULTS / f"quality-{stamp}.json"
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            if family == "charlm":
                result = charlm_quality(args.steps, Path(tmp), device)
                print(
                    f"charlm: {result['held_out_bits_per_char']:.3f} bits/char held out,"
                    f" unigram {result['unigram_bits_per_char']:.3f}",
                    flush=True,
                )
            else:
                result = image_family(family, args.steps, args.per_class, clf, Path(tmp), device)
                print(
                    f"{family}: accuracy {result['accuracy']:.3f} after {result['steps']} steps,"
                    f" {result['train_seconds']} s",
                    flush=True,
                )
            report["families"][family] = result
            path.write_text(json.dumps(report, indent=2))  # after each family: partial runs count
    print(f"written to {path}")


if __name__ == "__main__":
    main()

"""A face-pretrained surrogate for the TAP baseline: a ResNet-18 trained on other identities, then measured on glint24.

    OMP_NUM_THREADS=1 .venv/bin/python bench/tap_surrogate.py --pretrain shards/lfw423_64 --crop 32 --epochs 20 \
        --out runs/tap/lfw423crop_e20.safetensors --record bench/results/protection/screen/tap_surrogates.json
    .venv/bin/python bench/protection.py run --name tap30_lfw_surrogate --method tap --seeds 0 \
        --tap-pretrained runs/tap/lfw423crop_e20.safetensors --rows none,grayscale,iss --out bench/results/protection/screen

TAP (Fowl et al. 2021) draws its poisons from a surrogate that knows the task; the paper's is a trained CIFAR model.
Ours is trained on 2,019 faces. This script makes the one a platform could make without the victim's data: a
ResNet-18 (standard stem, the victim's) trained with cross-entropy on every photo of a labelled shard set of other
people (train and test splits), centre-cropped so the face fills the frame as in ArcFace-aligned glint24 crops, and
written as a backbone file for ``--tap-pretrained`` (safetensors; the head is re-initialised for the victim's
classes). It also records how accurate TAP's surrogate becomes on the target set (glint24 test faces) from fresh
weights and from this backbone, after the fine-tuning epochs given (the TAP baseline's own surrogate training).
Measured: docs/protection_research.md, section 9.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torchvision.transforms.functional import center_crop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segue_dist.baselines.tap import TAPConfig, train_surrogate  # noqa: E402
from segue_dist.evaluate import load_image_set  # noqa: E402
from segue_dist.models.classifiers import build_classifier  # noqa: E402
from segue_dist.utils.io import atomic_write_json  # noqa: E402
from segue_dist.weights import save_safetensors  # noqa: E402


def pretrain(shards: Path, crop: int, epochs: int, seed: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A ResNet-18 trained on every photo (train and test splits) of ``shards``, its images centre-cropped."""
    splits = [load_image_set(shards / split, workers=1) for split in ("train", "test")]
    images = torch.cat([s.images for s in splits])
    if crop > min(images.shape[-2:]):
        raise SystemExit(f"--crop {crop} is larger than the images ({images.shape[-2]}x{images.shape[-1]})")
    images = (center_crop(images, [crop, crop]) if crop else images).float() / 255
    labels = torch.cat([s.labels for s in splits])
    torch.manual_seed(seed)
    model = build_classifier("resnet18", splits[0].num_classes, images.shape[-1], small_stem=False)
    t0 = time.perf_counter()
    model = train_surrogate(model, images, labels, TAPConfig(train_epochs=epochs), seed)
    info = {"shards": str(shards), "crop": crop, "faces": len(labels), "identities": splits[0].num_classes}
    return model, {**info, "epochs": epochs, "seconds": round(time.perf_counter() - t0, 1)}


def target_accuracy(train: Any, test: Any, backbone: Path | None, epochs: int, seed: int) -> float:
    """Test accuracy (percent) on ``test`` of TAP's surrogate after ``epochs`` on the clean ``train`` split."""
    torch.manual_seed(seed)
    model = build_classifier(
        "resnet18", train.num_classes, train.images.shape[-1], pretrained=backbone, small_stem=False
    )
    model = train_surrogate(model, train.images.float() / 255, train.labels, TAPConfig(train_epochs=epochs), seed)
    with torch.no_grad():
        predicted = model(test.images.float() / 255).argmax(1)
    return round(float((predicted == test.labels).float().mean()) * 100, 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrain", type=Path, required=True, help="a labelled shard set of other identities")
    p.add_argument("--crop", type=int, default=32, help="centre crop side in pixels (0 = whole image)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--target", type=Path, default=Path("shards/glint24_32"), help="the set TAP will protect")
    p.add_argument("--finetune-epochs", default="10,30", help="comma-separated surrogate epochs on the target")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="backbone weights to write (.safetensors)")
    p.add_argument("--record", type=Path, required=True, help="JSON to write the measurements to")
    args = p.parse_args()
    model, record = pretrain(args.pretrain, args.crop, args.epochs, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(model.backbone.state_dict(), args.out)
    train, test = (load_image_set(args.target / split, workers=1) for split in ("train", "test"))
    accuracy: dict[str, dict[str, float]] = {"fresh": {}, "pretrained": {}}
    for epochs in (int(e) for e in args.finetune_epochs.split(",")):
        accuracy["fresh"][str(epochs)] = target_accuracy(train, test, None, epochs, args.seed)
        accuracy["pretrained"][str(epochs)] = target_accuracy(train, test, args.out, epochs, args.seed)
        print(f"{epochs} epochs on {args.target}: fresh {accuracy['fresh'][str(epochs)]}%, "
              f"pretrained {accuracy['pretrained'][str(epochs)]}%")  # fmt: skip
    atomic_write_json(
        args.record,
        {"pretrain": record, "backbone": str(args.out), "target": str(args.target), "seed": args.seed,
         "surrogate_test_accuracy": accuracy},
    )  # fmt: skip


if __name__ == "__main__":
    main()

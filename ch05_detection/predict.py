"""Detect objects in image files with a trained Faster R-CNN.

Loads the ``.keras`` model written by ``train_faster_rcnn.py``, runs it on one or more
images (PNG / JPEG, any size: they are resized to the model's input size, and the
normalized boxes map back onto the original image), prints the detections and writes
an annotated PNG per image. Ren et al. 2015, "Faster R-CNN".

Run from the repo root::

    python ch05_detection/predict.py image1.png image2.jpg \\
        --model runs/train_faster_rcnn/faster_rcnn.keras --out runs/predict --min-score 0.5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import keras
import numpy as np

from ch05_detection import faster_rcnn  # noqa: F401  (registers the custom layers)
from common import synthetic, viz


def read_image(path):
    """RGB float32 [H, W, 3] in [0, 1]; ValueError naming the file if it cannot be read."""
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"cannot read image file {str(path)!r} (expected a PNG or JPEG)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0


def detect_files(model, paths, min_score=0.5, class_names=None, out_dir=None):
    """Detections for image files: a list of dicts (path, boxes, classes, scores);
    writes ``<out_dir>/<name>_detections.png`` when ``out_dir`` is given."""
    class_names = class_names or [str(i) for i in range(model.num_classes)]
    results = []
    for path in paths:
        image = read_image(path)
        output = model.detect(image[None])
        n = int(output["num_detections"][0])
        keep = output["scores"][0, :n] >= min_score
        result = {"path": str(path), "boxes": output["boxes"][0, :n][keep],
                  "classes": output["classes"][0, :n][keep],
                  "scores": output["scores"][0, :n][keep]}
        results.append(result)
        if out_dir is not None:
            out_dir = Path(out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            viz.show_detections(image[None], result["boxes"][None], result["classes"][None],
                                scores=result["scores"][None], class_names=class_names, cols=1,
                                save_path=out_dir / f"{Path(path).stem}_detections.png")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--model", default="runs/train_faster_rcnn/faster_rcnn.keras",
                        help="saved .keras model")
    parser.add_argument("--out", default="runs/predict", help="folder for annotated PNGs")
    parser.add_argument("--min-score", type=float, default=0.5, help="score threshold")
    parser.add_argument("--class-names", default=",".join(synthetic.CLASS_NAMES),
                        help="comma-separated class names (default: the shapes classes)")
    args = parser.parse_args(argv)
    if not Path(args.model).exists():
        raise ValueError(f"--model {args.model!r} does not exist: train first with "
                         "python ch05_detection/train_faster_rcnn.py")
    model = keras.saving.load_model(args.model, compile=False)
    names = [n for n in args.class_names.split(",") if n]
    if len(names) < model.num_classes:
        names = [str(i) for i in range(model.num_classes)]
    results = detect_files(model, args.images, args.min_score, names, args.out)
    for result in results:
        print(f"{result['path']}: {len(result['classes'])} detection(s)")
        for box, class_id, score in zip(result["boxes"], result["classes"], result["scores"]):
            print(f"  {names[class_id]:>10s}  score {score:.3f}  box (ymin, xmin, ymax, xmax) "
                  f"{np.round(box, 3).tolist()}")
    print(f"annotated images in {args.out}/")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])

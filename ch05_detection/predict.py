"""Detect objects in image files with a trained detector (Faster R-CNN).

Loads the ``.keras`` model written by ``train_faster_rcnn.py`` (through
``ch05_detection.load_model``), runs it on one or more images (PNG / JPEG / BMP, any
size: they are resized to the model's input size, and the normalized boxes map back
onto the original image), prints the detections and writes an annotated PNG per image.
Ren et al. 2015, "Faster R-CNN".

Run from the repo root::

    python ch05_detection/predict.py image1.png image2.jpg \\
        --model runs/train_faster_rcnn/faster_rcnn.keras --out runs/predict --min-score 0.5

Class names, first found wins: ``--class-names``; the names saved in the model (its
``class_names``, given when it was built); a ``class_names.json`` beside the model file
(a JSON list of names in class-id order); otherwise ``class 0``, ``class 1``, ...

Each input is reported on its own line; a missing file, a folder or an unreadable image
is reported and skipped, and the script exits with status 1 at the end if any input
failed. Outputs are named ``<out>/<stem>_<extension>_detections.png`` (``a.png`` ->
``a_png_detections.png``), so inputs that differ only in extension or folder never
overwrite each other.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

DEFAULT_MODEL = "runs/train_faster_rcnn/faster_rcnn.keras"
CLASS_NAMES_FILE = "class_names.json"


# ----------------------------------------------------------------------------------
# inputs and outputs
# ----------------------------------------------------------------------------------
def read_image(path):
    """RGB float32 ``[H, W, 3]`` in [0, 1].

    Raises ValueError naming the file and what is wrong with it: it does not exist,
    it is a directory, or it is not an image OpenCV can decode.
    """
    import cv2

    path = Path(path)
    if not path.exists():
        raise ValueError(f"image file {str(path)!r} does not exist")
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a directory, not an image file")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{str(path)!r} is not a readable image "
                         "(expected a PNG, JPEG or BMP file that OpenCV can decode)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0


def output_names(paths):
    """One distinct annotated-PNG file name per input path, in order.

    ``dir/a.png`` -> ``a_png_detections.png``; a name already taken (the same file name
    in two folders, or the same path twice) gets ``_2``, ``_3``, ... appended.
    """
    names, taken = [], set()
    for path in paths:
        path = Path(path)
        extension = path.suffix.lstrip(".").lower()
        base = f"{path.stem}_{extension}" if extension else path.name
        name, copy = f"{base}_detections.png", 1
        while name in taken:
            copy += 1
            name = f"{base}_{copy}_detections.png"
        taken.add(name)
        names.append(name)
    return names


# ----------------------------------------------------------------------------------
# the model and its class names
# ----------------------------------------------------------------------------------
def load_detector(path):
    """A detector saved by this chapter; ValueError naming ``--model`` when the file is
    missing or holds something else (a classifier, a segmentation network)."""
    import ch05_detection

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--model {str(path)!r} does not exist: train a detector first with "
                         "python ch05_detection/train_faster_rcnn.py (it writes "
                         f"{DEFAULT_MODEL})")
    try:
        model = ch05_detection.load_model(path, compile=False)
    except ValueError as error:
        raise ValueError(f"--model {str(path)!r}: {error}") from error
    if not callable(getattr(model, "detect", None)):
        raise ValueError(
            f"--model {str(path)!r} holds a {type(model).__name__} model ({model.name!r}) "
            "without a detect() method: predict.py expects an object detector, such as the "
            "FasterRCNN that train_faster_rcnn.py saves as faster_rcnn.keras (a chapter-4 "
            "classifier is loaded with ch04_classification.load_model and used with "
            "model.predict)")
    return model


def default_class_names(num_classes):
    return [f"class {i}" for i in range(num_classes)]


def _check_names(names, num_classes, source):
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{source} must be a list of class names (strings), got {names!r}")
    names = [n.strip() for n in names]
    if num_classes is not None and len(names) != num_classes:
        raise ValueError(f"{source} gives {len(names)} class names {names}, but the model "
                         f"has {num_classes} classes")
    return names


def read_class_names_file(path, num_classes=None):
    """The names in a ``class_names.json`` file (a JSON list, in class-id order)."""
    try:
        names = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read class names from {str(path)!r}: {error} (expected a "
                         'JSON list of names in class-id order, e.g. ["cat", "dog"])') from error
    return _check_names(names, num_classes, f"{str(path)!r}")


def resolve_class_names(model, model_path=None, override=None):
    """``(names, source)``: the class names to print and draw, and where they came from.

    Order: ``override`` (``--class-names``), the model's own ``class_names`` (unless
    they are only the generic ``class i`` placeholders), ``class_names.json`` beside
    ``model_path``, and finally ``class 0``, ``class 1``, ... Never another data set's
    names.
    """
    num_classes = getattr(model, "num_classes", None)
    if override:
        return _check_names(list(override), num_classes, "--class-names"), "--class-names"
    saved = getattr(model, "class_names", None)
    if saved is not None:
        saved = _check_names(list(saved), num_classes, "the model's class_names")
        if num_classes is None or saved != default_class_names(num_classes):
            return saved, "the model"
    if model_path is not None:
        sidecar = Path(model_path).with_name(CLASS_NAMES_FILE)
        if sidecar.is_file():
            return read_class_names_file(sidecar, num_classes), str(sidecar)
    if saved is not None:
        return saved, "none saved with the model"
    if num_classes is None:
        raise ValueError("the model has neither `class_names` nor `num_classes`; "
                         "give the names with --class-names")
    return default_class_names(num_classes), "none saved with the model"


# ----------------------------------------------------------------------------------
# detection
# ----------------------------------------------------------------------------------
def detect_files(model, paths, min_score=0.5, class_names=None, out_dir=None):
    """Run ``model.detect`` on image files, one at a time; a bad file does not stop the rest.

    Returns one dict per path, in order: ``path``; ``error`` (None, or the message
    saying why the file was skipped); ``boxes`` ``[n, 4]`` normalized yxyx, ``classes``
    ``[n]``, ``scores`` ``[n]`` (empty for a skipped file); ``output``, the annotated PNG
    written to ``out_dir`` (None without ``out_dir`` or for a skipped file).
    """
    if class_names is None:
        class_names, _ = resolve_class_names(model)
    out_dir = None if out_dir is None else Path(out_dir)
    results = []
    for path, name in zip(paths, output_names(paths)):
        result = {"path": str(path), "error": None, "output": None,
                  "boxes": np.zeros((0, 4), np.float32), "classes": np.zeros((0,), np.int32),
                  "scores": np.zeros((0,), np.float32)}
        results.append(result)
        try:
            image = read_image(path)
        except ValueError as error:
            result["error"] = str(error)
            continue
        output = model.detect(image[None])
        n = int(output["num_detections"][0])
        keep = output["scores"][0, :n] >= min_score
        result.update(boxes=output["boxes"][0, :n][keep], classes=output["classes"][0, :n][keep],
                      scores=output["scores"][0, :n][keep])
        if out_dir is not None:
            from common import viz

            out_dir.mkdir(parents=True, exist_ok=True)
            result["output"] = str(out_dir / name)
            viz.show_detections(image[None], result["boxes"][None], result["classes"][None],
                                scores=result["scores"][None], class_names=class_names, cols=1,
                                save_path=result["output"])
    return results


# ----------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------
def build_parser():
    parser = argparse.ArgumentParser(
        prog="predict.py", description=__doc__.strip().splitlines()[0],
        epilog="Class names: --class-names, else the model's own, else class_names.json "
               "beside the model, else 'class 0', 'class 1', ... Exit status 1 if any image "
               "could not be read (the others are still processed).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("images", nargs="+", help="image files (PNG, JPEG, BMP)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="saved .keras detector (written by train_faster_rcnn.py)")
    parser.add_argument("--out", default="runs/predict",
                        help="folder for the annotated PNGs (<stem>_<extension>_detections.png)")
    parser.add_argument("--min-score", type=float, default=0.5,
                        help="print and draw detections scoring at least this (0 to 1)")
    parser.add_argument("--class-names", default=argparse.SUPPRESS,
                        help="comma-separated class names, one per class in id order "
                             "(default: the names saved with the model, see below)")
    return parser


def main(argv=None):
    """The command line; returns the results of ``detect_files`` (see there).

    Raises ValueError (naming the flag) for a bad ``--model`` or ``--class-names``;
    unreadable images are reported and skipped, not raised.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0.0 <= args.min_score <= 1.0:
        parser.error(f"--min-score must be in [0, 1], got {args.min_score}")
    model = load_detector(args.model)
    text = getattr(args, "class_names", None)
    override = None if text is None else [name for name in text.split(",") if name.strip()]
    names, source = resolve_class_names(model, args.model, override)
    print(f"class names ({source}): {', '.join(names)}")
    results = detect_files(model, args.images, args.min_score, names, args.out)
    for result in results:
        if result["error"] is not None:
            print(f"{result['path']}: skipped: {result['error']}", file=sys.stderr)
            continue
        print(f"{result['path']}: {len(result['classes'])} detection(s) -> {result['output']}")
        for box, class_id, score in zip(result["boxes"], result["classes"], result["scores"]):
            label = names[class_id] if 0 <= class_id < len(names) else f"class {class_id}"
            print(f"  {label:>10s}  score {score:.3f}  box (ymin, xmin, ymax, xmax) "
                  f"{np.round(box, 3).tolist()}")
    failed = sum(result["error"] is not None for result in results)
    if failed:
        print(f"{failed} of {len(results)} input(s) could not be read (see above)",
              file=sys.stderr)
    return results


def cli(argv=None):
    """``main`` as a program: exit status 0, 1 (some inputs failed) or 2 (bad options)."""
    try:
        results = main(argv)
    except ValueError as error:
        print(f"predict.py: error: {error}", file=sys.stderr)
        return 2
    return 1 if any(result["error"] is not None for result in results) else 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))

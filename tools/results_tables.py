"""The README's generated tables, from docs/results.json (one source for each full-run number).

    python tools/results_tables.py --check     # exit 1 if README.md's tables differ from the record
    python tools/results_tables.py --write     # rewrite them in README.md
    python tools/results_tables.py --record runs/train_detector_ssd train_detector_ssd \\
        --load "1.9 at the start, 2.3 at the end"  # copy a run's metrics.json into the record

A generated table sits in README.md between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``;
``tests/test_repo.py`` fails when it is not what this script renders, so a number changed in
docs/results.json without ``--write`` (or a table edited by hand) is caught.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results.json"
README = REPO / "README.md"

# The detector table of chapter 5: (record name, model shown, how it was run).
DETECTOR_ROWS = (
    ("train_faster_rcnn", "Faster R-CNN (joint)", "train_faster_rcnn.py"),
    ("train_detector_yolo", "YOLO v1", "train_detector.py --model yolo"),
    ("train_detector_yolo_anchors", "YOLO with anchors", "train_detector.py --model yolo_anchors"),
    ("train_detector_ssd", "SSD", "train_detector.py --model ssd"),
    ("train_detector_retinanet", "RetinaNet (focal loss)", "train_detector.py --model retinanet"),
    ("train_detector_retinanet_ce", "RetinaNet (cross-entropy)",
     "train_detector.py --model retinanet --classification-loss cross_entropy"),
    ("train_detector_centernet", "CenterNet", "train_detector.py --model centernet"),
    ("train_detector_detr", "DETR", "train_detector.py --model detr"),
)
# The detection lineage of chapter 5 (issue 10): (record name, method shown, how it was run, the
# record's key of its inference seconds per image). Both sliding-window rows come from one run:
# the same weights, the same detections, timed per window and convolutionally.
LINEAGE_ROWS = (
    ("train_rcnn_sliding_windows", "Sliding windows, per window",
     "train_rcnn.py --variant sliding_windows", "seconds_per_image_loop"),
    ("train_rcnn_sliding_windows", "Sliding windows, convolutional",
     "train_rcnn.py --variant sliding_windows", "seconds_per_image_conv"),
    ("train_rcnn_rcnn", "R-CNN", "train_rcnn.py --variant rcnn", "seconds_per_image"),
    ("train_rcnn_fast_rcnn", "Fast R-CNN", "train_rcnn.py --variant fast_rcnn",
     "seconds_per_image"),
    ("train_faster_rcnn", "Faster R-CNN", "train_faster_rcnn.py", "seconds_per_image"),
)
# Keys copied from a run's metrics.json by --record (the rest of metrics.json stays in the run).
RECORD_KEYS = (
    "model", "val_map50", "val_map", "val_map75", "val_pycocotools_map50", "val_pycocotools_map",
    "parameters", "train_seconds", "total_seconds_this_run", "epochs", "planned_epochs",
    "stopped_by_time_budget", "train_images_per_second", "inference_ms_batch1",
    "inference_ms_batch16", "val_accuracy", "val_mean_iou", "val_pixel_accuracy",
    "test_verification_accuracy", "test_roc_auc", "test_one_shot_top1",
    # the lineage table's (train_rcnn.py)
    "seconds_per_image", "seconds_per_image_loop", "seconds_per_image_conv",
    "speedup_conv_over_loop", "windows_per_image", "proposals_per_image", "proposal_recall_50",
    "proposal_recall_70", "proposal_seconds_per_image", "svm_stage_seconds",
    "svm_false_positives_per_round", "ablations", "num_train_examples",
    # the foundations' (train_localizer.py) and the denoiser's
    "val_presence_accuracy", "val_class_accuracy", "val_nme",
    "val_psnr_noisy", "val_psnr_denoised", "val_psnr_gain", "val_ssim_noisy", "val_ssim_denoised",
    "val_ssim_gain",
)
# and every key that starts with one of these (per-class IoUs, PSNR/SSIM per noise type)
RECORD_PREFIXES = ("val_iou_", "val_psnr_", "val_ssim_")


def _number(value, digits):
    if value is None:
        return "-"
    if isinstance(value, int) and digits == 0:
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def detector_table(runs):
    """Markdown of the detector table from the record's runs (rows not measured say so)."""
    lines = ["| model | command | parameters | val mAP@0.5 | mAP@[.5:.95] | training s | "
             "train images/s | inference ms/image (batch 1 / 16) | machine load |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, model, command in DETECTOR_ROWS:
        run = runs.get(name)
        if not run or run.get("val_map50") is None:
            lines.append(f"| {model} | `{command}` | | not measured yet | | | | | |")
            continue
        stale = " (stale)" if run.get("stale") else ""
        lines.append(
            f"| {model}{stale} | `{command}` | {_number(run.get('parameters'), 0)} | "
            f"{_number(run.get('val_map50'), 3)} | {_number(run.get('val_map'), 3)} | "
            f"{_number(run.get('train_seconds'), 0)} | "
            f"{_number(run.get('train_images_per_second'), 1)} | "
            f"{_number(run.get('inference_ms_batch1'), 1)} / "
            f"{_number(run.get('inference_ms_batch16'), 1)} | {run.get('load_average', '-')} |")
    return "\n".join(lines)


def _seconds_per_image(run, key):
    """The row's inference seconds per image; ``inference_ms_batch1`` (converted) for a record
    without ``key`` (Faster R-CNN's: one image per call as well)."""
    if run.get(key) is not None:
        return run[key]
    milliseconds = run.get("inference_ms_batch1")
    return None if milliseconds is None else milliseconds / 1000.0


def lineage_table(runs):
    """Markdown of the lineage table (sliding windows to Faster R-CNN) from the record's runs."""
    lines = ["| method | command | val mAP@0.5 | mAP@[.5:.95] | inference s/image | regions "
             "classified per image | region recall @0.5 / @0.7 | training s | machine load |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, method, command, seconds_key in LINEAGE_ROWS:
        run = runs.get(name)
        if not run or run.get("val_map50") is None:
            lines.append(f"| {method} | `{command}` | not measured yet | | | | | | |")
            continue
        stale = " (stale)" if run.get("stale") else ""
        recall = (f"{_number(run.get('proposal_recall_50'), 3)} / "
                  f"{_number(run.get('proposal_recall_70'), 3)}"
                  if run.get("proposal_recall_50") is not None else "-")
        lines.append(
            f"| {method}{stale} | `{command}` | {_number(run.get('val_map50'), 3)} | "
            f"{_number(run.get('val_map'), 3)} | "
            f"{_number(_seconds_per_image(run, seconds_key), 4)} | "
            f"{_number(run.get('proposals_per_image'), 0)} | {recall} | "
            f"{_number(run.get('train_seconds'), 0)} | {run.get('load_average', '-')} |")
    return "\n".join(lines)


# The schedule table of Faster R-CNN (Ren et al. 2015, sec. 3.2): (record name, schedule, backbone start).
SCHEDULE_COMMAND = "ch05_detection/train_faster_rcnn.py --backbone-width 16"
SCHEDULE_ROWS = (
    ("faster_rcnn_joint_w16", "joint", "random"),
    ("faster_rcnn_joint_w16_classifier", "joint", "the chapter-4 classifier"),
    ("faster_rcnn_alternating_w16", "alternating (4 steps)", "random"),
    ("faster_rcnn_alternating_w16_classifier", "alternating (4 steps)", "the chapter-4 classifier"),
)


def schedule_table(runs):
    """Markdown of joint vs alternating training, with and without a pretrained backbone."""
    lines = ["| `--schedule` | backbone starts from | val mAP@0.5 | mAP@[.5:.95] | training s | epochs | "
             "machine load |", "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for name, schedule, start in SCHEDULE_ROWS:
        run = runs.get(name)
        if not run or run.get("val_map50") is None:
            lines.append(f"| {schedule} | {start} | not measured yet | | | | |")
            continue
        epochs, planned = run.get("epochs"), run.get("planned_epochs")
        epochs_text = f"{epochs} of {planned}" if planned and planned != epochs else str(epochs)
        lines.append(f"| {schedule} | {start} | {_number(run.get('val_map50'), 3)} | "
                     f"{_number(run.get('val_map'), 3)} | {_number(run.get('train_seconds'), 0)} | "
                     f"{epochs_text} | {run.get('load_average', '-')} |")
    return "\n".join(lines)


# The default-runs table: (record name, script as run, what its headline numbers are).
def _fmt(run, template):
    try:
        return template.format(**run)
    except (KeyError, TypeError, ValueError):  # a number not measured (None) or not recorded
        return None


DEFAULT_RUN_ROWS = (
    ("train_classifier_lenet5_digits",
     "ch04_classification/train_classifier.py --model lenet5 --dataset digits",
     "LeNet-5 (1998) on scikit-learn's handwritten digits: val accuracy **{val_accuracy:.3f}**"),
    ("lenet5_1998_digits", "ch04_classification/train_classifier.py --model lenet5 --dataset digits "
     "--no-augment --batch-size 32 --epochs 15", "LeNet-5 (1998): val accuracy **{val_accuracy:.3f}**"),
    ("lenet5_modern_digits", "ch04_classification/train_classifier.py --model lenet5_modern --dataset "
     "digits --no-augment --batch-size 32 --epochs 15",
     "LeNet-5 modern (ReLU, max pooling): val accuracy **{val_accuracy:.3f}**"),
    ("train_localizer", "ch05_detection/train_localizer.py",
     "presence accuracy {val_presence_accuracy:.3f}, class accuracy **{val_class_accuracy:.3f}**, "
     "box IoU **{val_mean_iou:.3f}**"),
    ("train_localizer_landmarks", "ch05_detection/train_localizer.py --task landmarks",
     "presence accuracy {val_presence_accuracy:.3f}, NME **{val_nme:.3f}** of the image side"),
    ("train_classifier", "ch04_classification/train_classifier.py",
     "val accuracy **{val_accuracy:.3f}**"),
    ("score_explanations", "ch04_classification/score_explanations.py",
     "pointing game: Grad-CAM **{pointing_grad_cam:.3f}**, CAM {pointing_cam:.3f}, guided backprop "
     "{pointing_guided_backprop:.3f}, saliency {pointing_saliency:.3f}, occlusion "
     "{pointing_occlusion:.3f} (centre baseline {pointing_center:.3f}) at val accuracy {val_accuracy:.3f}"),
    ("train_siamese", "ch04_classification/train_siamese.py",
     "people never seen: verification **{test_verification_accuracy:.3f}**, ROC AUC {test_roc_auc:.3f}, "
     "20-way one-shot **{test_one_shot_top1:.3f}** (raw pixels: {test_pixel_verification_accuracy:.3f} / "
     "{test_pixel_roc_auc:.3f} / {test_pixel_one_shot_top1:.3f})"),
    ("train_faster_rcnn", "ch05_detection/train_faster_rcnn.py",
     "val mAP@0.5 **{val_map50:.3f}**, mAP@[.5:.95] {val_map:.3f} (the other detectors: the tables "
     "below)"),
    ("train_mask_rcnn", "ch06_segmentation/train_mask_rcnn.py",
     "mask mAP@0.5 **{val_mask_map50:.3f}**, mask mAP@[.5:.95] {val_mask_map:.3f}, box mAP@0.5 "
     "{val_map50:.3f}; where same-class shapes touch, instances recover "
     "{val_touching_instance_recovered} of {val_touching_objects} objects, the connected components "
     "of U-Net's semantic mask {val_unet_touching_semantic_recovered} (of a perfect semantic mask "
     "{val_touching_semantic_recovered})"),
    ("train_unet", "ch06_segmentation/train_unet.py", "val mean IoU **{val_mean_iou:.3f}**, pixel "
     "accuracy {val_pixel_accuracy:.3f}"),
    ("train_unet_fcn8s", "ch06_segmentation/train_unet.py --model fcn8s",
     "val mean IoU **{val_mean_iou:.3f}**, pixel accuracy {val_pixel_accuracy:.3f}"),
    ("train_denoiser", "ch06_segmentation/train_denoiser.py",
     "PSNR {val_psnr_noisy:.1f} -> **{val_psnr_denoised:.1f}** dB, SSIM {val_ssim_noisy:.2f} -> "
     "{val_ssim_denoised:.2f}"),
    ("run_style_transfer", "ch06_segmentation/run_style_transfer.py",
     "style cost {initial_style_cost:.4f} -> {style_cost:.5f} (reduction **{style_cost_reduction:.3f}**), "
     "random VGG-19 features, no download"),
)


def default_runs_table(runs):
    """Markdown of every script's default run (headline numbers, seconds, load) from the record."""
    lines = ["| `python ...` | result | training s | epochs | machine load | measured |",
             "| --- | --- | ---: | ---: | --- | --- |"]
    for name, script, template in DEFAULT_RUN_ROWS:
        run = runs.get(name) or {}
        result = _fmt(run, template)
        if result is None:
            lines.append(f"| `{script}` | not measured yet | | | | |")
            continue
        if run.get("stale"):
            result += " (stale: measured before the current training harness)"
        seconds = run.get("train_seconds", run.get("optimization_seconds"))
        epochs = run.get("epochs")
        planned = run.get("planned_epochs")
        epochs_text = "-" if epochs is None else (f"{epochs} of {planned}" if planned and planned != epochs
                                                  else str(epochs))
        measured = str(run.get("measured") or "-").split(";")[0]
        lines.append(f"| `{script}` | {result} | {_number(seconds, 0)} | {epochs_text} | "
                     f"{run.get('load_average', '-')} | {measured} |")
    return "\n".join(lines)


TABLES = {"detector-table": detector_table, "lineage-table": lineage_table,
          "default-runs": default_runs_table, "schedule-table": schedule_table}


def render(readme_text, runs):
    """README text with every generated table replaced by what the record gives."""
    for name, make in TABLES.items():
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        if begin not in readme_text or end not in readme_text:
            raise ValueError(f"README.md lacks the markers {begin} ... {end}")
        head, rest = readme_text.split(begin, 1)
        _, tail = rest.split(end, 1)
        readme_text = f"{head}{begin}\n{make(runs)}\n{end}{tail}"
    return readme_text


def load_runs(path=RESULTS):
    return json.loads(Path(path).read_text())["runs"]


def record(run_dir, name, load, path=RESULTS, command=None):
    """Copy the RECORD_KEYS of ``run_dir/metrics.json`` into the record as ``name``.

    ``command`` is the command line that made the run; without it the record keeps the one the
    previous entry of that name had.
    """
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise ValueError(f"{metrics_path}: no such file (finish the run first)")
    metrics = json.loads(metrics_path.read_text())
    config_path = run_dir / "config.json"
    entry = {key: value for key, value in metrics.items()
             if key in RECORD_KEYS or key.startswith(RECORD_PREFIXES)}
    if config_path.is_file():  # every option of the run (not where it wrote: a local path)
        entry["config"] = {k: v for k, v in json.loads(config_path.read_text()).items() if k != "out"}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    entry["load_average"] = load
    entry["measured"] = f"{date.today().isoformat()}, commit {commit or 'unknown'}"
    entry["stale"] = False
    content = json.loads(Path(path).read_text())
    command = command or (content["runs"].get(name) or {}).get("command")
    if command:
        entry["command"] = command
    content["runs"][name] = entry
    Path(path).write_text(json.dumps(content, indent=2) + "\n")
    return entry


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--check", action="store_true", help="exit 1 if README.md is out of date")
    group.add_argument("--write", action="store_true", help="rewrite the tables in README.md")
    group.add_argument("--record", nargs=2, metavar=("RUN_DIR", "NAME"),
                       help="copy RUN_DIR/metrics.json into docs/results.json as NAME")
    parser.add_argument("--load", default="", help="with --record: the machine's load average")
    parser.add_argument("--command", default=None,
                        help="with --record: the run's command line (default: the record's previous one)")
    args = parser.parse_args(argv)
    if args.record:
        if not args.load:
            parser.error("--record needs --load (the load average during the run)")
        try:
            record(*args.record, args.load, command=args.command)
        except ValueError as error:
            parser.error(str(error))
        return 0
    text = README.read_text()
    rendered = render(text, load_runs())
    if args.write:
        README.write_text(rendered)
        return 0
    if rendered != text:
        print("README.md's generated tables differ from docs/results.json: run "
              "python tools/results_tables.py --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

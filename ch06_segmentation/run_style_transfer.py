"""Neural style transfer: a photograph painted in the style of another image, by descent on pixels.

What this script teaches (Gatys, Ecker & Bethge 2016, "Image Style Transfer Using Convolutional
Neural Networks", CVPR): a generated image G starts as the content photograph C and its *pixels*
are optimised (the network stays fixed) to lower

    J(G) = alpha * J_content(C, G) + beta * J_style(S, G) + tv_weight * TV(G)

with the content cost at one VGG-19 layer and the Gram-matrix style cost summed over five layers
(``ch06_segmentation/style_transfer.py`` has the costs, the features and the optimisation loop).

No download: by default the VGG-19 of chapter 4 keeps its *random* weights, normalised so that
every filter's activations have root mean square 1 on C and S. Random features still carry style
(He, Wang & Hopcroft 2016, "A Powerful Generative Model Using Random Weights for the Deep Image
Representation"). With the internet, ``--weights imagenet`` uses keras.applications' trained
weights instead (the real thing); ``--weights path/to/model.keras`` uses a VGG-19 trained here
(``ch04_classification/train_classifier.py --model vgg19``), though in our two attempts that
network stayed at chance on the embedded shapes, so random weights are the offline default
(``notebooks/style_transfer.ipynb``, section 6).

The default photographs ship with scikit-learn (no download): ``china.jpg`` as content and the
petals of ``flower.jpg`` as style. Pass your own with ``--content-image`` / ``--style-image``.

Run from the repository root::

    python ch06_segmentation/run_style_transfer.py
    python ch06_segmentation/run_style_transfer.py --fast
    python ch06_segmentation/run_style_transfer.py --content-image me.jpg --style-image art.jpg
    python ch06_segmentation/run_style_transfer.py --weights imagenet --content-layer block4_conv2
    python ch06_segmentation/run_style_transfer.py --help

Writes into ``--out`` (default ``runs/run_style_transfer``): ``config.json``, ``generated.png``
(G at full size), ``panel.png`` (C | S | G), ``costs.png`` (content and style costs per step) and
``metrics.json`` with ``content_cost`` and ``style_cost`` (final, unweighted),
``initial_style_cost``, ``style_cost_reduction`` (1 - final / initial style cost), ``steps`` and
``seconds``.

The default run, measured once on the project's 2-core CPU shared with other jobs (load average
10.3 at the start, 7.8 at the end): 128 x 192 px, 150 Adam steps, 192 s in all (183 s of
optimisation). Style cost 0.0577 -> 0.00085, i.e. ``style_cost_reduction`` 0.985 (it passes 0.90
after about 40 steps, a minute in); content cost 0 -> 1.22e5. The pagoda stays recognisable,
repainted in the dahlia's oranges and reds with blotchy petal texture. ``--fast`` (48 px, 8 steps)
takes seconds. ``notebooks/style_transfer.ipynb`` shows what each layer, alpha / beta and the
content layer do.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import keras

from common import viz
from common.config import parse_config, save_config, write_metrics
from ch06_segmentation import style_transfer as st

@dataclass
class Config:
    """Neural style transfer (Gatys et al. 2016) on VGG-19 features; no download by default."""

    content_image: str = field(default="china.jpg", metadata={
        "help": "content photograph: an image file or a bundled sample "
                f"{sorted(st.SAMPLE_IMAGES)}"})
    style_image: str = field(default="flower_petals", metadata={
        "help": "style image: a file or a bundled sample (flower_petals = the dahlia of "
                "scikit-learn's flower.jpg, cropped to its petals)"})
    image_size: int = field(default=192, metadata={
        "help": "longer side of the generated image in pixels (the style image is resized to the "
                "same longer side)"})
    weights: str | None = field(default=None, metadata={
        "help": "VGG-19 weights: None (random, normalised; no download), 'imagenet' "
                "(keras.applications, downloaded once; needs the internet) or a .keras file of a "
                "VGG-19 trained with train_classifier.py --model vgg19"})
    statistic: str = field(default="rms", metadata={
        "help": "filter normalisation on C and S: rms (each filter's root mean square = 1) or mean "
                "(Gatys et al.: mean activation = 1)", "choices": ("rms", "mean")})
    pooling: str = field(default="avg", metadata={
        "help": "VGG pooling: avg (Gatys et al. sec. 2) or max", "choices": ("avg", "max")})
    content_layer: str = field(default="block3_conv2", metadata={
        "help": "VGG-19 layer of the content cost. Gatys et al. use block4_conv2 (conv4_2) with "
                "trained weights; with random weights a shallower layer keeps the layout "
                "recognisable (notebooks/style_transfer.ipynb compares them)"})
    style_layers: tuple[str, ...] = field(default=st.STYLE_LAYERS, metadata={
        "help": "VGG-19 layers of the style cost, comma-separated (Gatys' conv1_1 .. conv5_1)"})
    style_layer_weights: tuple[float, ...] = field(default=(), metadata={
        "help": "weight w_l of each style layer, comma-separated (empty: 1 / number of layers)"})
    content_weight: float = field(default=1.0, metadata={
        "help": "alpha, weight of the content cost"})
    style_weight: float = field(default=2e8, metadata={
        "help": "beta, weight of the style cost (the content cost grows with the image area: "
                "scale beta with it when you change --image-size)"})
    tv_weight: float = field(default=30.0, metadata={
        "help": "weight of the total variation of G (0 = off); it smooths the noise that "
                "random features otherwise leave"})
    init: str = field(default="content", metadata={
        "help": "where G starts: content (the photograph) or noise", "choices": st.INITIALIZATIONS})
    optimizer: str = field(default="adam", metadata={
        "help": "adam, or lbfgs (scipy's L-BFGS-B with pixels bounded to [0, 1], Gatys et al.'s "
                "choice)", "choices": st.OPTIMIZERS})
    learning_rate: float = field(default=0.01, metadata={
        "help": "Adam's step size on the [0, 1] pixel scale (not used by lbfgs)"})
    steps: int = field(default=150, metadata={"help": "optimisation steps (L-BFGS: iterations)"})
    time_budget_minutes: float = field(default=4.5, metadata={
        "help": "stop the optimisation after this many minutes (0 = no limit)"})
    log_every: int = field(default=20, metadata={"help": "print the costs every this many steps"})
    seed: int = field(default=0, metadata={"help": "seed of the random weights and of the noise"})
    out: str = field(default="runs/run_style_transfer", metadata={"help": "output folder"})
    fast: bool = field(default=False, metadata={
        "help": "tiny sizes for a smoke run (or CVTF_FAST=1)"})

    FAST: ClassVar[dict] = {"image_size": 48, "steps": 8, "log_every": 4}


def check_config(config: Config):
    """Option checks with the flag's name (image files are checked when they are read)."""
    if config.image_size < 32:
        raise ValueError(f"--image-size must be at least 32 (VGG-19 halves it 4 times before "
                         f"block5_conv1), got {config.image_size}")
    if config.steps < 0:
        raise ValueError(f"--steps must be >= 0, got {config.steps}")
    if not config.style_layers:
        raise ValueError("--style-layers is empty: give at least one VGG-19 layer, e.g. "
                         + ",".join(st.STYLE_LAYERS))
    known = st.vgg19_layer_names()
    for flag, names in (("--style-layers", config.style_layers),
                        ("--content-layer", (config.content_layer,))):
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ValueError(f"{flag}: unknown layers {unknown}; VGG-19's layers are {known}")
    if config.style_layer_weights and len(config.style_layer_weights) != len(config.style_layers):
        raise ValueError(f"--style-layer-weights has {len(config.style_layer_weights)} numbers for "
                         f"{len(config.style_layers)} --style-layers")
    for flag in ("content_weight", "style_weight", "tv_weight", "learning_rate",
                 "time_budget_minutes"):
        value = getattr(config, flag)
        if not math.isfinite(value) or value < 0:
            raise ValueError(
                f"--{flag.replace('_', '-')} must be a finite number >= 0, got {value}")
    if config.log_every < 0:
        raise ValueError(f"--log-every must be >= 0, got {config.log_every}")


def load_images(config: Config):
    """C at --image-size (longer side) and S at the same longer side, both [H, W, 3] in [0, 1]."""
    images = []
    for flag, source in (("--content-image", config.content_image),
                         ("--style-image", config.style_image)):
        try:
            images.append(st.load_image(source, max_size=config.image_size))
        except ValueError as error:
            raise ValueError(f"{flag}: {error}") from error
    return images


def save_pictures(content, style, generated, history, out: Path):
    """generated.png, panel.png (C | S | G) and costs.png (content and style cost per step)."""
    import matplotlib.pyplot as plt

    generated = generated.numpy()[0]
    plt.imsave(out / "generated.png", generated)
    figure = viz.show_images([content.numpy(), style.numpy(), generated],
                             titles=["content C", "style S", "generated G"], cols=3,
                             save_path=out / "panel.png")
    plt.close(figure)
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key, title in ((axes[0], "content", "content cost J_content(C, G)"),
                           (axes[1], "style", "style cost J_style(S, G)")):
        ax.plot(history["step"], history[key], marker=".", markersize=3)
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    figure.tight_layout()
    viz.save_figure(figure, out / "costs.png")
    plt.close(figure)


def main(argv=None) -> dict:
    config = parse_config(Config, argv, description=__doc__.splitlines()[0])
    check_config(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out)
    keras.utils.set_random_seed(config.seed)
    start = time.perf_counter()

    content, style = load_images(config)
    # Filters are normalised on C and S, each image counting alike.
    normalization_images = [content, style]
    layers = (config.content_layer, *config.style_layers)
    extractor = st.build_feature_extractor(layers, weights=config.weights, pooling=config.pooling,
                                           normalization_images=normalization_images,
                                           statistic=config.statistic)
    if config.style_layer_weights:
        style_layers = dict(zip(config.style_layers, config.style_layer_weights))
    else:
        style_layers = config.style_layers
    transfer = st.StyleTransfer(extractor, content, style, content_layer=config.content_layer,
                                style_layers=style_layers, content_weight=config.content_weight,
                                style_weight=config.style_weight, tv_weight=config.tv_weight)
    print(f"style transfer: C {config.content_image} {tuple(content.shape[:2])}, S "
          f"{config.style_image} {tuple(style.shape[:2])}, VGG-19 weights "
          f"{config.weights or 'random (normalised)'}, {config.optimizer}, {config.steps} steps")
    budget = 60.0 * config.time_budget_minutes if config.time_budget_minutes else None
    generated, history = st.optimize(
        transfer, transfer.initial_image(config.init, seed=config.seed), config.steps,
        optimizer=config.optimizer, learning_rate=config.learning_rate,
        log_every=config.log_every, time_budget_seconds=budget)
    seconds = time.perf_counter() - start

    initial_style, final_style = history["style"][0], history["style"][-1]
    metrics = {
        "content_cost": history["content"][-1],
        "style_cost": final_style,
        "initial_style_cost": initial_style,
        "style_cost_reduction": 1.0 - final_style / initial_style if initial_style > 0 else 0.0,
        "total_cost": history["total"][-1],
        "initial_total_cost": history["total"][0],
        "steps": history["step"][-1],
        "optimization_seconds": round(history["seconds"][-1], 2),
        "seconds": round(seconds, 2),
        "image_height": int(content.shape[0]),
        "image_width": int(content.shape[1]),
    }
    save_pictures(content, style, generated, history, out)
    write_metrics(metrics, out)
    print(f"\nSummary: style transfer, {metrics['image_height']}x{metrics['image_width']} px, "
          f"{metrics['steps']} {config.optimizer} steps in {seconds:.0f} s\n"
          f"  style cost {initial_style:.4g} -> {final_style:.4g} "
          f"(reduction {metrics['style_cost_reduction']:.3f}), content cost "
          f"{metrics['content_cost']:.4g}\n"
          f"  outputs in {out}/ (generated.png, panel.png, costs.png, metrics.json)")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])

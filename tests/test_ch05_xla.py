"""The Faster R-CNN training step compiled with XLA equals the step without it.

One FAST-size model (64 px, width 8, batch 4) and one fixed batch, shared by the tests. With
``compile(jit_compile=True)`` the whole ``train_step`` is one XLA cluster: RoIAlign by gathers
(``roi_ops.roi_align_gather``), the batched NMS (``boxes.nms_padded``), the samplers' random
numbers drawn the way TensorFlow's CPU kernels draw them (``targets.stateless_uniform``). Each
piece is tested against its TensorFlow counterpart in its own test file; here the whole step:
the same losses and, through plain SGD with learning rate 1 (the weight change *is* minus the
gradient), the same gradients as the uncompiled step with TensorFlow's kernels.
"""

import keras
import numpy as np
import pytest

from ch05_detection import roi_ops, rpn, train_faster_rcnn
from common import data as common_data
from common import synthetic


@pytest.fixture
def setup(without_op_determinism):
    # Keras refuses jit_compile=True while op determinism is on (another test may have turned it
    # on in this process): the conftest fixture turns it off for this test and back on after.
    config = train_faster_rcnn.Config(**train_faster_rcnn.Config.FAST)
    keras.utils.set_random_seed(0)
    dataset = common_data.load("shapes", "train", image_size=config.image_size,
                               num_examples=config.batch_size)
    batch = next(iter(common_data.batch_detection(dataset, config.batch_size, config.max_boxes,
                                                  drop_remainder=True)))
    model = train_faster_rcnn.build_model(config, len(synthetic.CLASS_NAMES),
                                          synthetic.CLASS_NAMES)
    # An untrained RPN scores every anchor ~0.5: neighbours in the score order differ by about
    # one float step, and XLA's sigmoid may round them the other way, which reorders the
    # proposals (a discrete choice, not a float error). Spread the scores as training does.
    kernel = model.rpn_head.objectness.kernel
    kernel.assign(50.0 * kernel)
    return model, batch, model.get_weights()


def one_sgd_step(model, batch, weights, jit_compile):
    """Losses of one ``train_on_batch`` and the gradient of every trainable variable."""
    model.set_weights(weights)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0), jit_compile=jit_compile)
    assert model.jit_compile is jit_compile  # not silently refused
    before = [v.numpy() for v in model.trainable_variables]
    losses = model.train_on_batch(batch, return_dict=True)
    gradients = [b - v.numpy() for b, v in zip(before, model.trainable_variables)]
    return losses, gradients


def test_compiled_train_step_equals_uncompiled(setup):
    model, batch, weights = setup
    losses, gradients = one_sgd_step(model, batch, weights, jit_compile=False)
    roi_layer, proposal_layer = model.roi_layer, model.proposal_layer
    assert (roi_layer.implementation, proposal_layer.nms) == ("crop_and_resize", "per_image")
    xla_losses, xla_gradients = one_sgd_step(model, batch, weights, jit_compile=True)
    # compile(jit_compile=True) switched the model to its XLA-compatible ops.
    assert (roi_layer.implementation, proposal_layer.nms) == ("gather", "batched")
    assert set(losses) == set(model.LOSS_NAMES)
    assert losses["head_class_loss"] > 0 and losses["rpn_class_loss"] > 0
    for name in model.LOSS_NAMES:
        np.testing.assert_allclose(xla_losses[name], losses[name], rtol=1e-4, err_msg=name)
    # Every trainable variable gets a gradient, equal up to float rounding (relative to the
    # largest entry of each variable's gradient).
    assert len(gradients) == len(model.trainable_variables)
    for variable, ours, theirs in zip(model.trainable_variables, xla_gradients, gradients):
        scale = max(float(np.abs(theirs).max()), 1e-6)
        np.testing.assert_allclose(ours / scale, theirs / scale, atol=2e-3, err_msg=variable.path)
    assert sum(float(np.abs(g).sum()) for g in gradients) > 0
    # And back: compiled without XLA, the model uses TensorFlow's kernels again.
    model.compile(optimizer=keras.optimizers.SGD(), jit_compile=False)
    assert isinstance(roi_layer, roi_ops.RoIAlign) and isinstance(proposal_layer, rpn.ProposalLayer)
    assert (roi_layer.implementation, proposal_layer.nms) == ("crop_and_resize", "per_image")

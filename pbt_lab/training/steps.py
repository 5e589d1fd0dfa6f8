"""The Trainer's traced calls: K fused training steps, and an evaluation pass.

The training call reads its hyperparameters from variables (the optimizer's rate, momentum and β's;
the trainer's weight decay, label smoothing and clipping norm), so PBT changes them in flight, without
a retrace; its batch dimension is free, so a new batch size is no retrace either. It returns what it
read, as read inside the call: what the audit compares with the config a restore should have left.
"""

from __future__ import annotations

import tensorflow as tf

from pbt_lab.config import TrainConfig
from pbt_lab.config.space import IN_FLIGHT_OPTIMIZER_ARGS
from pbt_lab.names import BATCH_SIZE, LR

EVAL_BATCH = 1000
# Read in flight by the training step (the trainer's variables); the optimizer's own arguments
# (momentum, β₁, β₂) are read by its update (optimizers.OPTIMIZER_ARGS).
STEP_ARGS = ("weight_decay", "label_smoothing", "clip_norm")
NO_CLIP = float("inf")  # the clipping norm's variable without clipping


def model_inputs(images: tf.Tensor) -> tf.Tensor:
    """What the model sees: uint8 images scaled to [0, 1]; float32 images as the user gave them."""
    return tf.cast(images, tf.float32) / 255.0 if images.dtype == tf.uint8 else images


def train_steps(model, x, y, optimizer, in_flight: dict, cfg: TrainConfig):
    """``train_steps(batches)``: one update per row of ``batches`` (image indices into ``x``), stopping at a
    divergence if ``cfg`` says so. Returns (steps done, loss sum, correct, diverged, {key: value read})."""
    variables = model.trainable_variables
    max_loss = cfg.divergence_loss or float("inf")
    stop = cfg.stop_on_divergence
    weight_decay, smoothing, clip_norm = (in_flight[name] for name in STEP_ARGS)
    optimizer_args = {
        arg: getattr(optimizer, arg) for arg in IN_FLIGHT_OPTIMIZER_ARGS if hasattr(optimizer, arg)
    }

    # Any batch size: one trace serves them all (a batch-size change is not a retrace).
    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32)], jit_compile=cfg.jit_compile)
    def train(batches):
        done, loss_sum, correct = tf.constant(0), tf.constant(0.0), tf.constant(0)
        diverged = tf.constant(False)
        used = {LR: tf.identity(optimizer.learning_rate), BATCH_SIZE: tf.shape(batches)[1]}
        used |= {name: tf.identity(in_flight[name]) for name in STEP_ARGS}
        used |= {arg: tf.identity(tf.cast(v, tf.float32)) for arg, v in optimizer_args.items()}
        for i in tf.range(tf.shape(batches)[0]):
            xb = model_inputs(tf.gather(x, batches[i]))
            yb = tf.gather(y, batches[i])
            with tf.GradientTape() as tape:
                logits = model(xb, training=True)
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(yb, logits))
                # Label smoothing s: targets (1 − s) one-hot + s / K (at s = 0 exactly the plain loss).
                uniform = -tf.reduce_mean(tf.nn.log_softmax(logits), axis=-1)
                loss = (1.0 - smoothing) * loss + smoothing * tf.reduce_mean(uniform)
            if not tf.math.is_finite(loss) or loss > max_loss:
                diverged = tf.constant(True)
                if stop:
                    break  # before the update: the weights stay as they were
            gradients = tape.gradient(loss, variables)
            # Each a branch of the graph taken only when in use (a pass over every weight costs as much as
            # an update of plain gradient descent): scaled to the clipping norm when above it...
            if clip_norm < NO_CLIP:
                scale = tf.minimum(1.0, clip_norm / tf.linalg.global_norm(gradients))
                gradients = [g * scale for g in gradients]
            if weight_decay > 0.0:  # ...and decoupled weight decay, before the update (Keras's order)
                decay = weight_decay * tf.cast(optimizer.learning_rate, tf.float32)
                for v in variables:
                    v.assign_sub(v * decay)
            optimizer.apply(gradients, variables)
            done += 1
            loss_sum += loss
            correct += tf.reduce_sum(tf.cast(tf.argmax(logits, 1, output_type=tf.int32) == yb, tf.int32))
        return done, loss_sum, correct, diverged, used

    return train


def evaluation(model, images):
    """``evaluate(x, y)``: (accuracy, mean loss) of ``model`` on ``x``, ``EVAL_BATCH`` images at a time."""

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, *images.shape[1:]], images.dtype),
            tf.TensorSpec([None], tf.int32),
        ]
    )
    def evaluate(x, y):
        n = tf.shape(y)[0]
        loss_sum, correct = tf.constant(0.0), tf.constant(0)
        for start in tf.range(0, n, EVAL_BATCH):
            xb = model_inputs(x[start : start + EVAL_BATCH])
            yb = y[start : start + EVAL_BATCH]
            logits = model(xb, training=False)
            loss_sum += tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(yb, logits))
            correct += tf.reduce_sum(tf.cast(tf.argmax(logits, 1, output_type=tf.int32) == yb, tf.int32))
        n_float = tf.cast(n, tf.float32)
        return tf.cast(correct, tf.float32) / n_float, loss_sum / n_float

    return evaluate

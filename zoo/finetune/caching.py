"""Feature caching: when the frozen layers meet the trained ones in one tensor (zoo.graph.cut), the frozen
part runs once over the images and training runs on its stored output every epoch."""

from __future__ import annotations

import time
import weakref

from zoo.graph import cut
from zoo.progress import bar


def features(base, samples, spec, batch_size: int, chunk_images: int = 512, desc: str = "frozen layers"):
    """The frozen base's output for `samples`, computed once, by chunks whose images are all decoded (tf.data,
    every core) before the forward pass over them starts. Decoding beside the pass stalls oneDNN's
    convolutions, which wait for their slowest thread: for 1,000 AlexNet images on 2 cores the overlapped
    pass took 39-48 s, decode plus pass alone 4-6 s plus 22-26 s. A tf.function loop: 35 images/s up to fc6
    here, where Model.predict managed 23."""
    import numpy as np

    from zoo.data import Samples, eval_dataset

    forward = _forward(base)
    step = max(1, chunk_images // batch_size) * batch_size  # whole batches, as one dataset would make them
    out = []
    with bar(len(samples), desc, "img") as progress:
        for i in range(0, len(samples), step):
            part = Samples(samples.paths[i:i + step], samples.labels[i:i + step], samples.classes)
            images = [x for x, _ in eval_dataset(part, spec, batch_size)]  # all decoded before the pass (above)
            for x in images:
                out.append(forward(x).numpy())
                progress.update(len(out[-1]))
    return np.concatenate(out)


_FORWARDS = weakref.WeakKeyDictionary()


def _forward(base):
    """One traced inference function per frozen base: training images, validation images and the run's report
    reuse it (a tf.function made per call retraces, and TensorFlow warns about it). It holds the base weakly,
    so a finished run's model can still be freed."""
    import tensorflow as tf

    if base not in _FORWARDS:
        model = weakref.ref(base)
        _FORWARDS[base] = tf.function(lambda x: model()(x, training=False), reduce_retracing=True)
    return _FORWARDS[base]


def split_at(model, spec, first_trained: str):
    """(frozen base, trainable top) sharing the layers of `model`, split where zoo.graph.cut says."""
    import keras

    from zoo.backends.keras import call_layers

    at, start = cut(spec.nodes, first_trained)
    base = keras.Model(model.input, model.get_layer(at).output, name="frozen_base")
    inputs = keras.Input(shape=spec.node(at).output_shape, name="features")
    rest = spec.nodes[start:]
    tensors = call_layers(rest, {n.name: model.get_layer(n.name) for n in rest}, {at: inputs})
    return base, keras.Model(inputs, tensors[rest[-1].name], name="trained_top")


def cached_datasets(plan, base):
    """(training dataset over the remaining epochs, validation dataset, the training features, seconds of the
    frozen pass over the training images)."""
    import numpy as np
    import tensorflow as tf

    from zoo.data import batch_per_epoch, untuned
    from zoo.finetune.plan import say

    cfg, train, val = plan.cfg, plan.train, plan.val
    t = time.perf_counter()
    train_x = features(base, train, plan.spec, cfg.batch_size, desc="frozen layers, training images")
    seconds = time.perf_counter() - t
    val_x = features(base, val, plan.spec, cfg.batch_size, desc="frozen layers, validation images")
    say(f"cached {plan.trained[0]}'s inputs: {len(train)} training images in {seconds:.1f}s, "
        f"{len(val)} validation in {time.perf_counter() - t - seconds:.1f}s")
    order = np.concatenate([np.random.default_rng([cfg.seed, e]).permutation(len(train)) for e in range(plan.first_epoch, cfg.epochs)])
    stored = tf.constant(train_x)  # batches gather from one copy, not an epochs-long one
    train_ds = batch_per_epoch(tf.data.Dataset.from_tensor_slices((order, train.labels[order])), len(train), cfg.batch_size)
    train_ds = untuned(train_ds.map(lambda i, y: (tf.gather(stored, i), y)))
    val_ds = untuned(tf.data.Dataset.from_tensor_slices((val_x, val.labels)).batch(cfg.batch_size))
    return train_ds, val_ds, train_x, seconds

"""The fused optimizers follow Keras' SGD and Adam step by step (same rule, same state)."""

import keras
import numpy as np
import pytest

from zoo.optimizers import FusedAdam, FusedSGD


def _train(optimizer):
    """8 steps of a small dense model on fixed data: (initial weights, trained weights, optimizer variables)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="relu"), keras.layers.Dense(3)])
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    initial = model.get_weights()
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(32, 6)).astype("float32"), rng.integers(0, 3, 32)
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    return initial, model.get_weights(), [v.numpy() for v in optimizer.variables]


@pytest.mark.parametrize("fused, keras_own, kw", [
    (FusedSGD, keras.optimizers.SGD, dict(learning_rate=0.1, momentum=0.9)),
    (FusedSGD, keras.optimizers.SGD, dict(learning_rate=0.1, momentum=0.9, nesterov=True)),
    (FusedAdam, keras.optimizers.Adam, dict(learning_rate=0.01)),
])
def test_fused_update_equals_keras(fused, keras_own, kw):
    initial, got, got_state = _train(fused(**kw))
    _, want, want_state = _train(keras_own(**kw))
    assert len(got_state) == len(want_state)
    for a, b in zip(got + got_state, want + want_state):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got[0], initial[0])  # the steps did move the weights

"""Drivers that turn a spec's graph into a runnable model: keras (TensorFlow) and onnx.

Each walks the graph once in order, asks every layer kind for its form, and owns the layout: Keras
runs NHWC as the canonical tensors are; the ONNX graph runs NCHW behind one input transpose.
"""

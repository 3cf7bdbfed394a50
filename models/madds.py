"""Multiply-add counts read from a built Keras model (the paper's "FLPS" are multiply-adds).

Counted per image (batch dimension excluded), from each layer's actual input/output shapes:

- Conv2D: ``H_out * W_out * C_out * (k_h * k_w * C_in / groups)``
- DepthwiseConv2D: ``H_out * W_out * C_in * depth_multiplier * k_h * k_w``
- SeparableConv2D: depthwise part + pointwise ``H_out * W_out * C_out * C_in * depth_multiplier``
- Dense: ``prod(leading non-batch dims) * units * C_in``

Biases, normalisation, pooling and activations are not counted, as in Tables 1-2. Nested models
are counted recursively; a layer called several times is counted once per call.
"""
import math

import keras


def _shape(t):
    return tuple(t.shape)


def _layer_call_shapes(layer):
    """(input_shape, output_shape) for every call of ``layer`` in its functional graph."""
    shapes = []
    for node in getattr(layer, "_inbound_nodes", []):
        ins = node.input_tensors
        outs = node.output_tensors
        if not ins or not outs:
            continue
        shapes.append((_shape(ins[0]), _shape(outs[0])))
    if not shapes:
        try:
            shapes.append((_shape(layer.input), _shape(layer.output)))
        except (AttributeError, ValueError):
            pass
    return shapes


def _layer_madds(layer, in_shape, out_shape):
    if isinstance(layer, keras.layers.SeparableConv2D):
        kh, kw = layer.kernel_size
        cin = in_shape[-1]
        h, w, cout = out_shape[1:4]
        return h * w * cin * layer.depth_multiplier * (kh * kw + cout)
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        kh, kw = layer.kernel_size
        h, w, cout = out_shape[1:4]
        return h * w * cout * kh * kw
    if isinstance(layer, keras.layers.Conv2D):
        kh, kw = layer.kernel_size
        cin = in_shape[-1] if layer.data_format == "channels_last" else in_shape[1]
        if layer.data_format == "channels_last":
            h, w, cout = out_shape[1:4]
        else:
            cout, h, w = out_shape[1:4]
        return h * w * cout * kh * kw * cin // layer.groups
    if isinstance(layer, keras.layers.Dense):
        lead = math.prod(d for d in in_shape[1:-1])
        return lead * in_shape[-1] * layer.units
    return 0


def count_madds(model) -> int:
    """Multiply-adds per image of ``model`` (int), counted from its built conv and dense layers."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += count_madds(layer)
            continue
        for in_shape, out_shape in _layer_call_shapes(layer):
            if any(d is None for d in out_shape[1:]) or any(d is None for d in in_shape[1:]):
                raise ValueError(f"count_madds: layer {layer.name} has unknown spatial size "
                                 f"{in_shape} -> {out_shape}; build the model at a fixed image size")
            total += _layer_madds(layer, in_shape, out_shape)
    return int(total)


def layer_madds(model):
    """[(layer name, multiply-adds per image)] for the counted layers of ``model``, in order."""
    rows = []
    for layer in model.layers:
        for in_shape, out_shape in _layer_call_shapes(layer):
            m = _layer_madds(layer, in_shape, out_shape)
            if m:
                rows.append((layer.name, int(m)))
    return rows

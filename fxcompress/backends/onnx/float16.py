"""fp32 -> fp16 conversion of an exported ONNX model (fp16 activations and float weights; integer codes kept)."""
from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

__all__ = ["to_float16"]


def to_float16(model):
    """A copy of an fp32 ONNX model (``onnx.ModelProto``) with fp16 activations and float weights.

    Every float32 initializer / ``Constant`` / ``ConstantOfShape`` value becomes float16, ``Cast(to=FLOAT)``
    becomes ``Cast(to=FLOAT16)``, float32 graph inputs / outputs become float16 and intermediate shape
    information is dropped (ONNX Runtime infers it again).  ``MatMulNBits`` scales (and float zero points)
    follow, as its activation and scale types must match.  Integer tensors (token ids, packed codes) are
    untouched.  For GPU benchmarks (CUDA EP): many CPU EP kernels have no fp16 version.
    """
    m = copy.deepcopy(model)
    g = m.graph
    # ops whose float inputs must stay fp32 (ONNX Range has no fp16 type): their float constants are kept and
    # their output is cast to fp16
    keep_fp32 = {"Range"}
    keep_names = {i for n in g.node if n.op_type in keep_fp32 for i in n.input}

    def conv(t, name=None):
        if t.data_type == TensorProto.FLOAT and (name or t.name) not in keep_names:
            arr = numpy_helper.to_array(t).astype(np.float16)
            t.CopyFrom(numpy_helper.from_array(arr, t.name))

    for t in g.initializer:
        conv(t)
    nodes = []
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                conv(a.t, node.output[0] if node.output else None)
            elif (node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT
                  and node.output[0] not in keep_names):
                a.i = TensorProto.FLOAT16
        nodes.append(node)
        if node.op_type in keep_fp32:
            out = node.output[0]
            node.output[0] = out + "_fp32"
            nodes.append(onnx.helper.make_node("Cast", [out + "_fp32"], [out], to=TensorProto.FLOAT16,
                                               name=(node.name or out) + "_to_fp16"))
    del g.node[:]
    g.node.extend(nodes)
    for vi in list(g.input) + list(g.output):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    del g.value_info[:]
    return m

"""Single-node test cases for the gradient engine (tests/test_engine.py): every op type the
engine implements, with the attribute variants that change its semantics. Each case becomes
one node of a per-opset test graph whose outputs are compared with ONNX Runtime."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

rng = np.random.default_rng(0)


def f32(*shape, lo=None, hi=None):
    if lo is not None:
        return rng.uniform(lo, hi, size=shape).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


def i64(*vals):
    return np.array(vals, dtype=np.int64)


@dataclass
class Case:
    name: str
    op: str
    inputs: list  # arrays; None = omitted optional input
    attrs: dict = field(default_factory=dict)
    outputs: int = 1
    opset: int = 18
    static: tuple = ()  # indices of inputs given as initializers (shape operands)
    fold: bool = False  # also add a copy whose inputs are all initializers (numpy path)
    loose: bool = False  # spa.ir's loader refuses it (deprecated / newer opset): bypass it
    grad: bool = True  # in the gradient check (off for variants that only change static
    #                    index / weight computations, to keep the compile small)
    domain: str = ""

    @property
    def key(self) -> str:  # as spa.engine.supported_ops() names it
        return f"{self.domain}:{self.op}" if self.domain else self.op


CASES: list[Case] = []


def case(name, op, inputs, attrs=None, *, outputs=1, opset=18, static=(), fold=False,
         loose=False, grad=True, domain=""):
    CASES.append(Case(name, op, inputs, attrs or {}, outputs, opset, tuple(static), fold,
                      loose or opset > 23, grad, domain))


X = f32(2, 3, 4, 5)
POS = f32(2, 3, 4, 5, lo=0.1, hi=3.0)
UNIT = f32(2, 3, 4, 5, lo=-0.95, hi=0.95)

for op_, x in [("Abs", X), ("Neg", X), ("Sqrt", POS), ("Exp", X), ("Log", POS),
               ("Reciprocal", POS), ("Floor", X * 3), ("Ceil", X * 3), ("Sign", X),
               ("Sin", X), ("Cos", X), ("Tan", UNIT), ("Asin", UNIT), ("Acos", UNIT),
               ("Atan", X), ("Sinh", X), ("Cosh", X), ("Asinh", X), ("Acosh", POS + 1),
               ("Atanh", UNIT), ("Tanh", X), ("Relu", X), ("Sigmoid", X), ("Softplus", X),
               ("Softsign", X), ("Identity", X), ("Erf", X), ("HardSwish", X * 4),
               ("Mish", X), ("IsNaN", np.where(X > 1, np.nan, X).astype(np.float32))]:
    case(op_.lower(), op_, [x], fold=op_ in ("Sqrt", "Relu", "Sigmoid", "Erf"))
case("round", "Round", [np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.3, -0.7], np.float32)])
case("isinf", "IsInf", [np.array([np.inf, -np.inf, 1.0, np.nan], np.float32)],
     {"detect_negative": 0})
case("elu", "Elu", [X], {"alpha": 0.7})
case("selu", "Selu", [X])
case("celu", "Celu", [X], {"alpha": 1.5})
case("hard_sigmoid", "HardSigmoid", [X * 4], {"alpha": 0.3, "beta": 0.4})
case("leaky_relu", "LeakyRelu", [X], {"alpha": 0.2})
case("thresholded_relu", "ThresholdedRelu", [X], {"alpha": 0.5})
case("shrink", "Shrink", [X], {"bias": 0.2, "lambd": 0.4})
case("gelu", "Gelu", [X], opset=20)
case("gelu_tanh", "Gelu", [X], {"approximate": "tanh"}, opset=20)
case("swish", "Swish", [X], {"alpha": 1.3}, opset=24)
case("prelu", "PRelu", [X, f32(3, 1, 1)])
case("clip", "Clip", [X, np.array(-0.5, np.float32), np.array(0.7, np.float32)], static=(1, 2))
case("clip_max", "Clip", [X, None, np.array(0.2, np.float32)], static=(2,))

B = np.array([[True, False, True], [False, False, True]])
case("not", "Not", [B])
for op_ in ("And", "Or", "Xor"):
    case(op_.lower(), op_, [B, np.array([True, False, False])])
IA = np.array([[-7, 5, 3, -2], [9, -4, 0, 6]], np.int64)
IB = np.array([3, -2, 5, 4], np.int64)
for op_ in ("BitwiseAnd", "BitwiseOr", "BitwiseXor"):
    case(op_.lower(), op_, [IA, IB])
case("bitwise_not", "BitwiseNot", [IA])
U8 = np.array([1, 2, 64, 255], np.uint8)
case("bitshift_left", "BitShift", [U8, np.array([1, 2, 1, 0], np.uint8)], {"direction": "LEFT"})
case("bitshift_right", "BitShift", [U8, np.array([1, 2, 3, 4], np.uint8)],
     {"direction": "RIGHT"})
case("mod_int", "Mod", [IA, IB])
case("fmod", "Mod", [X * 5, np.full((5,), 1.7, np.float32)], {"fmod": 1})
case("div_int", "Div", [IA, IB])

Y = f32(3, 1, 5)
for op_ in ("Add", "Sub", "Mul", "Div"):
    case(op_.lower(), op_, [X, Y], fold=op_ == "Mul")
case("pow", "Pow", [POS, Y])
case("pow_int_exp", "Pow", [X, np.array(2, np.int64)])
for op_ in ("Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"):
    case(op_.lower(), op_, [np.round(X), np.round(Y)])
for op_ in ("Max", "Min", "Sum", "Mean"):
    case(op_.lower(), op_, [X, Y, f32(5)])
case("where", "Where", [X > 0, X, Y])
case("cast_int", "Cast", [X * 3], {"to": TensorProto.INT64})
case("cast_bool", "Cast", [np.round(X)], {"to": TensorProto.BOOL})
case("cast_float", "Cast", [IA], {"to": TensorProto.FLOAT}, fold=True)
case("castlike", "CastLike", [IA, np.zeros(1, np.float32)])
case("dropout", "Dropout", [X], outputs=2)
case("constant", "Constant", [], {"value": onnx.numpy_helper.from_array(f32(2, 3))})
case("constant_ints", "Constant", [], {"value_ints": [3, 1, 2]})

case("shape", "Shape", [X])
case("shape_slice", "Shape", [X], {"start": 1, "end": -1})
case("size", "Size", [X])
case("reshape", "Reshape", [X, i64(0, -1, 5)], static=(1,))
case("reshape_allowzero", "Reshape", [X, i64(6, 4, 5)], {"allowzero": 1}, static=(1,))
case("flatten", "Flatten", [X], {"axis": 2})
case("flatten_neg", "Flatten", [X], {"axis": -1})
case("transpose", "Transpose", [X], {"perm": [0, 2, 3, 1]})
case("transpose_default", "Transpose", [X])
case("squeeze", "Squeeze", [f32(2, 1, 3, 1), i64(1, -1)], static=(1,))
case("squeeze_all", "Squeeze", [f32(2, 1, 3, 1)])
case("unsqueeze", "Unsqueeze", [f32(2, 3), i64(0, -1)], static=(1,))
case("concat", "Concat", [X, f32(2, 2, 4, 5)], {"axis": 1}, fold=True)
case("concat_neg", "Concat", [X, f32(2, 3, 4, 1)], {"axis": -1})
case("split", "Split", [X, i64(1, 2)], {"axis": 1}, outputs=2, static=(1,))
case("split_num", "Split", [X], {"axis": 3, "num_outputs": 2}, outputs=2)
case("slice", "Slice", [X, i64(1, -1), i64(3, 0), i64(2, 3), i64(1, -2)], static=(1, 2, 3, 4))
case("slice_big", "Slice", [X, i64(-100, 1), i64(2**62, 100)], static=(1, 2), fold=True)
case("slice_rev", "Slice", [X, i64(-1), i64(-2**62), i64(1), i64(-1)], static=(1, 2, 3, 4))
case("gather", "Gather", [X, i64(0, -1, 1)], {"axis": 2}, static=(1,), fold=True)
case("gather_runtime", "Gather", [f32(10, 4), np.array([[1, 9], [-1, 0]], np.int64)])
case("gather_elements", "GatherElements",
     [f32(3, 4), np.array([[0, 1, 3], [2, -1, 0], [1, 1, 1]], np.int64)], {"axis": 1})
case("gather_nd", "GatherND", [f32(2, 3, 4), np.array([[[1, 2]], [[0, -1]]], np.int64)],
     {"batch_dims": 1})
case("gather_nd0", "GatherND", [f32(3, 4), np.array([[0, 1], [2, 3]], np.int64)], fold=True)
case("scatter_nd", "ScatterND", [f32(4, 3), np.array([[1], [3]], np.int64), f32(2, 3)])
case("scatter_nd_add", "ScatterND", [f32(4, 3), np.array([[1, 0], [1, 0]], np.int64), f32(2)],
     {"reduction": "add"})
case("scatter_elements", "ScatterElements",
     [f32(3, 4), np.array([[1, 0], [2, 3]], np.int64), f32(2, 2)], {"axis": 1})
case("expand", "Expand", [f32(3, 1), i64(2, 1, 4)], static=(1,))
case("tile", "Tile", [f32(2, 3), i64(2, 3)], static=(1,))
case("constant_of_shape", "ConstantOfShape", [i64(2, 3)],
     {"value": onnx.numpy_helper.from_array(np.array([1.5], np.float32))}, static=(0,))
case("constant_of_shape_int", "ConstantOfShape", [i64(3)],
     {"value": onnx.numpy_helper.from_array(np.array([7], np.int64))}, static=(0,))
case("eye_like", "EyeLike", [f32(3, 4)], {"k": 1})
case("range", "Range", [np.array(1, np.int64), np.array(10, np.int64), np.array(3, np.int64)],
     static=(0, 1, 2))
case("range_float", "Range", [np.array(0.5, np.float32), np.array(2.0, np.float32),
                              np.array(0.4, np.float32)], static=(0, 1, 2))
case("nonzero", "NonZero", [np.array([[1, 0, 2], [0, 3, 0]], np.int64)], static=(0,))
case("compress", "Compress", [f32(3, 4), np.array([True, False, True, True])], {"axis": 1},
     static=(1,))
case("one_hot", "OneHot", [np.array([[1, 3], [0, -1]], np.int64), np.array(4, np.int64),
                           np.array([0.0, 2.0], np.float32)], {"axis": 1}, static=(1,))
case("trilu", "Trilu", [f32(2, 4, 5), np.array(1, np.int64)], static=(1,))
case("trilu_lower", "Trilu", [f32(4, 5)], {"upper": 0})
case("cumsum", "CumSum", [f32(3, 4), np.array(1, np.int64)], static=(1,))
case("cumsum_excl_rev", "CumSum", [f32(3, 4), np.array(0, np.int64)],
     {"exclusive": 1, "reverse": 1}, static=(1,))
case("depth_to_space", "DepthToSpace", [f32(1, 8, 2, 3)], {"blocksize": 2})
case("depth_to_space_crd", "DepthToSpace", [f32(1, 8, 2, 3)], {"blocksize": 2, "mode": "CRD"})
case("space_to_depth", "SpaceToDepth", [f32(1, 2, 4, 6)], {"blocksize": 2})
case("pad", "Pad", [X, i64(0, 1, 2, 0, 0, 0, 1, -1), np.array(0.5, np.float32)],
     static=(1, 2))
case("pad_axes", "Pad", [X, i64(1, 2, 3, 0), None, i64(1, 3)], static=(1, 3))
for mode in ("reflect", "edge", "wrap"):
    case(f"pad_{mode}", "Pad", [X, i64(0, 0, 1, 2, 0, 0, 2, 1)], {"mode": mode}, static=(1,))

for r in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
          "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"):
    xin = POS if r == "ReduceLogSum" else X
    case(r.lower(), r, [xin, i64(1, -1)], static=(1,))
    case(r.lower() + "_all", r, [xin], {"keepdims": 0})
case("reducemean_attr", "ReduceMean", [X], {"axes": [2, 3]}, opset=13)
case("reducesum_noop", "ReduceSum", [X, np.zeros(0, np.int64)], {"noop_with_empty_axes": 1},
     static=(1,))
case("argmax", "ArgMax", [np.round(X)], {"axis": 1})
case("argmin_last", "ArgMin", [np.round(X)], {"axis": -1, "keepdims": 0,
                                              "select_last_index": 1})
for op_ in ("Softmax", "LogSoftmax", "Hardmax"):
    case(op_.lower(), op_, [X], {"axis": 1})
    case(op_.lower() + "_legacy", op_, [X], {"axis": 2}, opset=11)
    case(op_.lower() + "_legacy_default", op_, [X], opset=11)

C3 = f32(3, lo=0.5, hi=2.0)
case("batch_norm", "BatchNormalization", [X, C3, f32(3), f32(3), C3], {"epsilon": 1e-3})
case("instance_norm", "InstanceNormalization", [X, C3, f32(3)])
case("layer_norm", "LayerNormalization", [X, f32(4, 5), f32(4, 5)], {"axis": 2}, outputs=3)
case("layer_norm_nobias", "LayerNormalization", [X, f32(5)])
case("rms_norm", "RMSNormalization", [X, f32(5)], opset=23)
case("group_norm18", "GroupNormalization", [f32(2, 6, 3, 3), f32(3), f32(3)],
     {"num_groups": 3}, loose=True)  # GroupNormalization-18 is deprecated
case("group_norm21", "GroupNormalization", [f32(2, 6, 3, 3), f32(6), f32(6)],
     {"num_groups": 3}, opset=21)
case("mvn", "MeanVarianceNormalization", [X])
case("lrn", "LRN", [f32(2, 6, 3, 3)], {"size": 3, "alpha": 0.01, "beta": 0.7, "bias": 1.5})

case("matmul", "MatMul", [f32(2, 1, 3, 4), f32(3, 4, 5)], fold=True)
case("matmul_vec", "MatMul", [f32(4), f32(2, 4, 3)])
case("gemm", "Gemm", [f32(4, 3), f32(5, 4), f32(5)],
     {"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0})
case("gemm_noc", "Gemm", [f32(3, 4), f32(4, 5)])
case("einsum", "Einsum", [f32(2, 3, 4), f32(2, 4, 5)], {"equation": "bij,bjk->bik"})
case("einsum_trace", "Einsum", [f32(3, 3)], {"equation": "ii"})

XI = f32(2, 4, 9, 8)
case("conv", "Conv", [XI, f32(6, 2, 3, 3), f32(6)],
     {"group": 2, "pads": [1, 0, 2, 1], "strides": [2, 1], "dilations": [1, 2]})
case("conv_same_upper", "Conv", [XI, f32(3, 4, 4, 3)], {"auto_pad": "SAME_UPPER",
                                                        "strides": [2, 2]})
case("conv_same_lower", "Conv", [XI, f32(3, 4, 4, 3)], {"auto_pad": "SAME_LOWER",
                                                        "strides": [2, 3]})
case("conv_depthwise", "Conv", [XI, f32(4, 1, 3, 3)], {"group": 4, "pads": [1, 1, 1, 1]})
case("conv1d", "Conv", [f32(2, 3, 11), f32(4, 3, 3), f32(4)], {"strides": [2]})
case("conv3d", "Conv", [f32(1, 2, 4, 5, 6), f32(3, 2, 2, 3, 3)], {"pads": [1, 0, 1, 0, 1, 1]})
case("conv_transpose", "ConvTranspose", [f32(2, 4, 5, 6), f32(4, 3, 3, 3), f32(6)],
     {"group": 2, "strides": [2, 3], "pads": [1, 0, 0, 1], "output_padding": [1, 0]})
case("conv_transpose_dil", "ConvTranspose", [f32(1, 2, 5, 5), f32(2, 3, 2, 3)],
     {"dilations": [2, 1], "strides": [1, 2]})
case("conv_transpose_shape", "ConvTranspose", [f32(1, 2, 5, 5), f32(2, 3, 3, 3)],
     {"strides": [2, 2], "output_shape": [10, 12]})
case("conv_transpose_shape_upper", "ConvTranspose", [f32(1, 2, 5, 5), f32(2, 3, 3, 3)],
     {"strides": [2, 2], "output_shape": [8, 10], "auto_pad": "SAME_UPPER"})
case("conv_transpose_same", "ConvTranspose", [f32(1, 2, 5, 5), f32(2, 3, 3, 3)],
     {"strides": [2, 2], "auto_pad": "SAME_UPPER"})
case("conv_transpose_same_lower", "ConvTranspose", [f32(1, 2, 5, 5), f32(2, 3, 4, 3)],
     {"strides": [2, 2], "auto_pad": "SAME_LOWER"})
case("conv_transpose1d", "ConvTranspose", [f32(2, 3, 7), f32(3, 2, 4)], {"strides": [3]})

XP = f32(2, 3, 9, 10)
case("maxpool", "MaxPool", [XP], {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [1, 0, 1, 1]})
case("maxpool_ceil", "MaxPool", [XP], {"kernel_shape": [2, 3], "strides": [2, 2],
                                       "ceil_mode": 1, "dilations": [2, 1]})
case("maxpool_small", "MaxPool", [f32(2, 3, 1, 5)], {"kernel_shape": [2, 2], "strides": [2, 2]})
case("avgpool_small", "AveragePool", [f32(2, 3, 1, 5)], {"kernel_shape": [2, 2],
                                                         "strides": [2, 2]})
case("maxpool_same", "MaxPool", [XP], {"kernel_shape": [3, 3], "strides": [2, 2],
                                       "auto_pad": "SAME_UPPER"})
case("avgpool", "AveragePool", [XP], {"kernel_shape": [3, 3], "strides": [2, 2],
                                      "pads": [1, 1, 1, 1]})
case("avgpool_incl", "AveragePool", [XP], {"kernel_shape": [3, 3], "strides": [2, 2],
                                           "pads": [1, 1, 0, 1], "count_include_pad": 1})
case("avgpool_ceil", "AveragePool", [XP], {"kernel_shape": [2, 2], "strides": [2, 2],
                                           "ceil_mode": 1, "pads": [1, 0, 1, 0],
                                           "count_include_pad": 1})
case("avgpool_1d", "AveragePool", [f32(2, 3, 11)], {"kernel_shape": [3], "strides": [2]})
case("lppool", "LpPool", [XP], {"kernel_shape": [2, 2], "strides": [2, 2], "p": 3})
case("global_avgpool", "GlobalAveragePool", [XP], fold=True)
case("global_maxpool", "GlobalMaxPool", [XP])
case("global_lppool", "GlobalLpPool", [XP], {"p": 3})
case("max_roi_pool", "MaxRoiPool", [f32(2, 3, 8, 8), np.array(
    [[0, 0, 0, 7, 7], [1, 2, 1, 5, 6], [0, 3, 3, 3, 3]], np.float32)],
    {"pooled_shape": [2, 3], "spatial_scale": 1.0}, static=(1,), grad=False)  # (int boxes)

XR = f32(1, 2, 4, 5)
for ctm in ("half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel",
            "tf_half_pixel_for_nn", "half_pixel_symmetric"):
    for mode in ("nearest", "linear", "cubic"):
        if ctm == "tf_half_pixel_for_nn" and mode != "nearest":
            continue
        case(f"resize_{mode}_{ctm}", "Resize",
             [XR, None, np.array([1, 1, 1.5, 0.6], np.float32)],
             {"mode": mode, "coordinate_transformation_mode": ctm}, static=(2,),
             grad=ctm == "half_pixel")
for nm in ("round_prefer_ceil", "floor", "ceil"):
    case(f"resize_nearest_{nm}", "Resize", [XR, None, np.array([1, 1, 2.5, 1.7], np.float32)],
         {"mode": "nearest", "nearest_mode": nm}, static=(2,))
case("resize_sizes", "Resize", [XR, None, None, i64(1, 2, 7, 3)], {"mode": "linear"},
     static=(3,), grad=False)
case("resize_axes", "Resize", [XR, None, None, i64(3, 9)], {"mode": "nearest", "axes": [2, 3]},
     static=(3,))
case("resize_keep_aspect", "Resize", [XR, None, None, i64(8, 8)],
     {"mode": "linear", "axes": [2, 3], "keep_aspect_ratio_policy": "not_larger"}, static=(3,),
     grad=False)
case("resize_cubic_excl", "Resize", [XR, None, np.array([1, 1, 2, 2], np.float32)],
     {"mode": "cubic", "exclude_outside": 1, "cubic_coeff_a": -0.5}, static=(2,), grad=False)
case("resize_crop", "Resize", [XR, np.array([0, 0, 0.2, 0.1, 1, 1, 0.9, 1.2], np.float32),
                               np.array([1, 1, 2, 1.5], np.float32)],
     {"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize",
      "extrapolation_value": -3.0}, static=(1, 2), grad=False)
case("resize_opset11", "Resize", [XR, np.zeros(0, np.float32),
                                  np.array([1, 1, 2, 2], np.float32)],
     {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
      "nearest_mode": "floor"}, opset=11, static=(1, 2))
for mode in ("nearest", "linear"):  # Upsample is deprecated since opset 10
    case(f"upsample_{mode}", "Upsample", [XR, np.array([1, 1, 2, 1.5], np.float32)],
         {"mode": mode}, opset=9, static=(1,), loose=True)

case("quantize", "QuantizeLinear", [X * 10, np.array(0.1, np.float32), np.array(3, np.uint8)])
case("quantize_axis", "QuantizeLinear", [X, f32(3, lo=0.01, hi=0.1), np.array([0, 1, -2],
                                                                              np.int8)])
case("dequantize", "DequantizeLinear", [np.array([[0, 5, 250]], np.uint8),
                                        np.array(0.5, np.float32), np.array(4, np.uint8)])
case("dequantize_axis", "DequantizeLinear", [np.arange(6, dtype=np.int8).reshape(2, 3),
                                             f32(3, lo=0.1, hi=1), np.array([1, 0, -1],
                                                                            np.int8)],
     {"axis": 1})
case("topk", "TopK", [f32(3, 7), i64(3)], outputs=2, static=(1,))
case("topk_smallest", "TopK", [f32(3, 7, 2), i64(2)], {"axis": 1, "largest": 0}, outputs=2,
     static=(1,))

T_, NB, IN, H = 5, 3, 4, 6
case("lstm", "LSTM", [f32(T_, NB, IN), f32(1, 4 * H, IN), f32(1, 4 * H, H), f32(1, 8 * H)],
     {"hidden_size": H}, outputs=3, grad=False)  # (LSTM gradients: the zoo's LSTM model)
case("lstm_bidir", "LSTM",
     [f32(T_, NB, IN), f32(2, 4 * H, IN), f32(2, 4 * H, H), f32(2, 8 * H),
      np.array([5, 3, 1], np.int32), f32(2, NB, H), f32(2, NB, H), f32(2, 3 * H)],
     {"hidden_size": H, "direction": "bidirectional"}, outputs=3, grad=False)
case("lstm_reverse", "LSTM", [f32(T_, NB, IN), f32(1, 4 * H, IN), f32(1, 4 * H, H)],
     {"hidden_size": H, "direction": "reverse", "clip": 0.8, "input_forget": 1}, outputs=3,
     grad=False)
case("gru", "GRU", [f32(T_, NB, IN), f32(1, 3 * H, IN), f32(1, 3 * H, H), f32(1, 6 * H)],
     {"hidden_size": H}, outputs=2)
case("gru_lbr", "GRU", [f32(T_, NB, IN), f32(2, 3 * H, IN), f32(2, 3 * H, H), f32(2, 6 * H),
                        np.array([2, 5, 4], np.int32)],
     {"hidden_size": H, "linear_before_reset": 1, "direction": "bidirectional"}, outputs=2,
     grad=False)
case("rnn", "RNN", [f32(T_, NB, IN), f32(1, H, IN), f32(1, H, H), f32(1, 2 * H)],
     {"hidden_size": H, "activations": ["Relu"]}, outputs=2)

case("attention", "Attention", [f32(2, 4, 5, 8), f32(2, 4, 6, 8), f32(2, 4, 6, 8),
                                f32(5, 6)], opset=23)
case("attention_gqa", "Attention", [f32(2, 5, 16), f32(2, 5, 8), f32(2, 5, 8)],
     {"q_num_heads": 4, "kv_num_heads": 2, "is_causal": 1, "scale": 0.3}, opset=23)

# ai.onnx.ml: what skl2onnx puts around classifiers
ML = {"domain": "ai.onnx.ml"}
case("array_feature_extractor", "ArrayFeatureExtractor",
     [np.arange(10, dtype=np.int64), np.array([[3], [7], [0]], np.int64)], **ML)
case("array_feature_extractor_2d", "ArrayFeatureExtractor",
     [f32(3, 5), np.array([4, 0, 2], np.int64)], **ML)
case("scaler", "Scaler", [f32(4, 3)], {"offset": [0.5, -1.0, 2.0], "scale": [2.0, 0.5, 3.0]},
     **ML)
for norm in ("MAX", "L1", "L2"):
    case(f"normalizer_{norm.lower()}", "Normalizer", [f32(4, 3, lo=0.5, hi=2.0)],
         {"norm": norm}, **ML)


def _value(name, arr):
    return helper.make_tensor_value_info(
        name, helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape))


def build(cases: list[Case], opset: int):
    """One graph holding every case as an independent node; returns (model, feeds,
    outputs: list of (case name, output name))."""
    nodes, inputs, inits, feeds, outs = [], [], [], {}, []
    for cs in cases:
        for variant in ((False, True) if cs.fold else (False,)):
            tag = cs.name + ("_folded" if variant else "")
            names = []
            for k, arr in enumerate(cs.inputs):
                if arr is None:
                    names.append("")
                    continue
                n = f"{tag}_in{k}"
                names.append(n)
                if variant or k in cs.static:
                    inits.append(onnx.numpy_helper.from_array(np.asarray(arr), n))
                else:
                    inputs.append(_value(n, np.asarray(arr)))
                    feeds[n] = np.asarray(arr)
            while names and names[-1] == "":
                names.pop()
            out_names = [f"{tag}_out{k}" for k in range(cs.outputs)]
            nodes.append(helper.make_node(cs.op, names, out_names, name=tag,
                                          domain=cs.domain or None, **cs.attrs))
            outs += [(tag, o) for o in out_names]
    g = helper.make_graph(nodes, f"engine_cases_opset{opset}", inputs, [], inits)
    imports = [helper.make_opsetid("", opset)]
    if any(cs.domain == "ai.onnx.ml" for cs in cases):
        imports.append(helper.make_opsetid("ai.onnx.ml", 3))
    model = helper.make_model(g, opset_imports=imports)
    model.ir_version = 10 if opset >= 21 else 8
    inferred = onnx.shape_inference.infer_shapes(model)
    vi = {v.name: v for v in inferred.graph.value_info}
    for _, o in outs:
        if o in vi:
            model.graph.output.append(vi[o])
        else:  # inference gave up (function-defined ops): the type of the node's input 0
            node = next(n for n in nodes if o in n.output)
            src = node.input[0]
            arr = feeds.get(src)
            if arr is None:
                arr = next(onnx.numpy_helper.to_array(t) for t in inits if t.name == src)
            model.graph.output.append(helper.make_tensor_value_info(
                o, helper.np_dtype_to_tensor_dtype(arr.dtype), None))
    return model, feeds, outs

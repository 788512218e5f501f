"""The part of Caffe's message schema this reader uses, built as a descriptor at import time.

Only the messages and fields the reader looks at are declared; their field numbers are Caffe's
wire-format numbers, so a binary ``.caffemodel`` decodes with them, and anything else in a file
(solver settings, data layers' parameters, fillers) is skipped as an unknown field. The schema
lives in a private :class:`~google.protobuf.descriptor_pool.DescriptorPool`: no ``protoc``, no
generated module, and no clash with a ``caffe_pb2`` the user may have imported.

Examples
--------
>>> net = NetParameter()
>>> layer = net.layer.add(name="conv1", type="Convolution")
>>> layer.convolution_param.num_output = 8
>>> NetParameter.FromString(net.SerializeToString()).layer[0].convolution_param.bias_term
True
>>> V1_TYPE_NAMES[4]
'Convolution'
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = ["NetParameter", "BlobProto", "BlobShape", "V1_TYPE_NAMES", "TEST_PHASE"]

_PACKAGE = "caffe"
_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "string": _F.TYPE_STRING, "bool": _F.TYPE_BOOL, "float": _F.TYPE_FLOAT, "double": _F.TYPE_DOUBLE,
    "int32": _F.TYPE_INT32, "int64": _F.TYPE_INT64, "uint32": _F.TYPE_UINT32,
}

#: Phase enum values (TRAIN = 0); a deploy net is read in the TEST phase.
TEST_PHASE = 1

# Each message: (name, fields, nested enums). A field is (name, number, type[, default]); a type
# ending in "*" is repeated; a capitalised type names a message or enum (relative to the package).
_MESSAGES = [
    ("BlobShape", [("dim", 1, "int64*")], {}),
    ("BlobProto", [("num", 1, "int32"), ("channels", 2, "int32"), ("height", 3, "int32"), ("width", 4, "int32"),
                   ("data", 5, "float*"), ("shape", 7, "BlobShape"), ("double_data", 8, "double*")], {}),
    ("NetStateRule", [("phase", 1, "Phase"), ("min_level", 2, "int32"), ("max_level", 3, "int32"),
                      ("stage", 4, "string*"), ("not_stage", 5, "string*")], {}),
    ("BatchNormParameter", [("use_global_stats", 1, "bool"), ("eps", 3, "float", "1e-05")], {}),
    ("BiasParameter", [("axis", 1, "int32", "1"), ("num_axes", 2, "int32", "1")], {}),
    ("ConcatParameter", [("concat_dim", 1, "uint32", "1"), ("axis", 2, "int32", "1")], {}),
    ("ConvolutionParameter", [
        ("num_output", 1, "uint32"), ("bias_term", 2, "bool", "true"), ("pad", 3, "uint32*"),
        ("kernel_size", 4, "uint32*"), ("group", 5, "uint32", "1"), ("stride", 6, "uint32*"),
        ("pad_h", 9, "uint32", "0"), ("pad_w", 10, "uint32", "0"), ("kernel_h", 11, "uint32"),
        ("kernel_w", 12, "uint32"), ("stride_h", 13, "uint32"), ("stride_w", 14, "uint32"),
        ("axis", 16, "int32", "1"), ("dilation", 18, "uint32*"),
    ], {}),
    ("CropParameter", [("axis", 1, "int32", "2"), ("offset", 2, "uint32*")], {}),
    ("EltwiseParameter", [("operation", 1, "EltwiseParameter.EltwiseOp", "SUM"), ("coeff", 2, "float*")],
     {"EltwiseOp": ["PROD", "SUM", "MAX"]}),
    ("ELUParameter", [("alpha", 1, "float", "1")], {}),
    ("FlattenParameter", [("axis", 1, "int32", "1"), ("end_axis", 2, "int32", "-1")], {}),
    ("InnerProductParameter", [("num_output", 1, "uint32"), ("bias_term", 2, "bool", "true"),
                               ("axis", 5, "int32", "1"), ("transpose", 6, "bool", "false")], {}),
    ("InputParameter", [("shape", 1, "BlobShape*")], {}),
    ("LRNParameter", [("local_size", 1, "uint32", "5"), ("alpha", 2, "float", "1"), ("beta", 3, "float", "0.75"),
                      ("norm_region", 4, "LRNParameter.NormRegion", "ACROSS_CHANNELS"), ("k", 5, "float", "1")],
     {"NormRegion": ["ACROSS_CHANNELS", "WITHIN_CHANNEL"]}),
    ("PoolingParameter", [
        ("pool", 1, "PoolingParameter.PoolMethod", "MAX"), ("kernel_size", 2, "uint32"), ("stride", 3, "uint32", "1"),
        ("pad", 4, "uint32", "0"), ("kernel_h", 5, "uint32"), ("kernel_w", 6, "uint32"), ("stride_h", 7, "uint32"),
        ("stride_w", 8, "uint32"), ("pad_h", 9, "uint32", "0"), ("pad_w", 10, "uint32", "0"),
        ("global_pooling", 12, "bool", "false"), ("round_mode", 13, "PoolingParameter.RoundMode", "CEIL"),
    ], {"PoolMethod": ["MAX", "AVE", "STOCHASTIC"], "RoundMode": ["CEIL", "FLOOR"]}),
    ("PowerParameter", [("power", 1, "float", "1"), ("scale", 2, "float", "1"), ("shift", 3, "float", "0")], {}),
    ("PReLUParameter", [("channel_shared", 2, "bool", "false")], {}),
    ("ReLUParameter", [("negative_slope", 1, "float", "0")], {}),
    ("ReshapeParameter", [("shape", 1, "BlobShape"), ("axis", 2, "int32", "0"), ("num_axes", 3, "int32", "-1")], {}),
    ("ScaleParameter", [("axis", 1, "int32", "1"), ("num_axes", 2, "int32", "1"), ("bias_term", 4, "bool", "false")], {}),
    ("SliceParameter", [("slice_dim", 1, "uint32", "1"), ("slice_point", 2, "uint32*"), ("axis", 3, "int32", "1")], {}),
    ("SoftmaxParameter", [("axis", 2, "int32", "1")], {}),
]

# Layer-specific parameter fields: name -> (message, number in LayerParameter, number in the V1 message).
_LAYER_PARAMS = {
    "concat_param": ("ConcatParameter", 104, 9), "convolution_param": ("ConvolutionParameter", 106, 10),
    "eltwise_param": ("EltwiseParameter", 110, 24), "inner_product_param": ("InnerProductParameter", 117, 17),
    "lrn_param": ("LRNParameter", 118, 18), "pooling_param": ("PoolingParameter", 121, 19),
    "power_param": ("PowerParameter", 122, 21), "relu_param": ("ReLUParameter", 123, 30),
    "softmax_param": ("SoftmaxParameter", 125, 39), "slice_param": ("SliceParameter", 126, 31),
    "prelu_param": ("PReLUParameter", 131, None), "reshape_param": ("ReshapeParameter", 133, None),
    "flatten_param": ("FlattenParameter", 135, None), "batch_norm_param": ("BatchNormParameter", 139, None),
    "elu_param": ("ELUParameter", 140, None), "bias_param": ("BiasParameter", 141, None),
    "scale_param": ("ScaleParameter", 142, None), "input_param": ("InputParameter", 143, None),
    "crop_param": ("CropParameter", 144, None),
}

#: The V1 ``layers`` message names its type with an enum; these are the V2 type strings they mean.
_V1_TYPES = {
    0: "None", 1: "Accuracy", 2: "BNLL", 3: "Concat", 4: "Convolution", 5: "Data", 6: "Dropout",
    7: "EuclideanLoss", 8: "Flatten", 9: "HDF5Data", 10: "HDF5Output", 11: "Im2col", 12: "ImageData",
    13: "InfogainLoss", 14: "InnerProduct", 15: "LRN", 16: "MultinomialLogisticLoss", 17: "Pooling",
    18: "ReLU", 19: "Sigmoid", 20: "Softmax", 21: "SoftmaxWithLoss", 22: "Split", 23: "TanH", 24: "WindowData",
    25: "Eltwise", 26: "Power", 27: "SigmoidCrossEntropyLoss", 28: "HingeLoss", 29: "MemoryData", 30: "ArgMax",
    31: "Threshold", 32: "DummyData", 33: "Slice", 34: "MVN", 35: "AbsVal", 36: "Silence", 37: "ContrastiveLoss",
    38: "Exp", 39: "Deconvolution",
}
_V1_ENUM_NAMES = {
    0: "NONE", 1: "ACCURACY", 2: "BNLL", 3: "CONCAT", 4: "CONVOLUTION", 5: "DATA", 6: "DROPOUT",
    7: "EUCLIDEAN_LOSS", 8: "FLATTEN", 9: "HDF5_DATA", 10: "HDF5_OUTPUT", 11: "IM2COL", 12: "IMAGE_DATA",
    13: "INFOGAIN_LOSS", 14: "INNER_PRODUCT", 15: "LRN", 16: "MULTINOMIAL_LOGISTIC_LOSS", 17: "POOLING",
    18: "RELU", 19: "SIGMOID", 20: "SOFTMAX", 21: "SOFTMAX_LOSS", 22: "SPLIT", 23: "TANH", 24: "WINDOW_DATA",
    25: "ELTWISE", 26: "POWER", 27: "SIGMOID_CROSS_ENTROPY_LOSS", 28: "HINGE_LOSS", 29: "MEMORY_DATA",
    30: "ARGMAX", 31: "THRESHOLD", 32: "DUMMY_DATA", 33: "SLICE", 34: "MVN", 35: "ABSVAL", 36: "SILENCE",
    37: "CONTRASTIVE_LOSS", 38: "EXP", 39: "DECONVOLUTION",
}
V1_TYPE_NAMES: dict[int, str] = dict(_V1_TYPES)


def _add_field(msg, name: str, number: int, kind: str, default: str | None = None) -> None:
    repeated = kind.endswith("*")
    kind = kind.rstrip("*")
    field = msg.field.add(name=name, number=number, label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL)
    if kind in _SCALARS:
        field.type = _SCALARS[kind]
    else:
        field.type_name = f".{_PACKAGE}.{kind}"
        field.type = _F.TYPE_ENUM if kind in _ENUMS else _F.TYPE_MESSAGE
    if default is not None:
        field.default_value = default


def _add_enum(container, name: str, values) -> None:
    enum = container.enum_type.add(name=name)
    for number, value in (values.items() if isinstance(values, dict) else enumerate(values)):
        enum.value.add(name=value, number=number)


_ENUMS = {"Phase", "V1LayerParameter.LayerType"} | {
    f"{name}.{enum}" for name, _, enums in _MESSAGES for enum in enums
}


def _file() -> descriptor_pb2.FileDescriptorProto:
    fd = descriptor_pb2.FileDescriptorProto(name="surgery_caffe_subset.proto", package=_PACKAGE, syntax="proto2")
    _add_enum(fd, "Phase", ["TRAIN", "TEST"])
    for name, fields, enums in _MESSAGES:
        msg = fd.message_type.add(name=name)
        for enum, values in enums.items():
            _add_enum(msg, enum, values)
        for field in fields:
            _add_field(msg, *field)
    layer = fd.message_type.add(name="LayerParameter")
    for field in (("name", 1, "string"), ("type", 2, "string"), ("bottom", 3, "string*"), ("top", 4, "string*"),
                  ("blobs", 7, "BlobProto*"), ("include", 8, "NetStateRule*"), ("exclude", 9, "NetStateRule*")):
        _add_field(layer, *field)
    v1 = fd.message_type.add(name="V1LayerParameter")
    _add_enum(v1, "LayerType", _V1_ENUM_NAMES)
    for field in (("bottom", 2, "string*"), ("top", 3, "string*"), ("name", 4, "string"),
                  ("type", 5, "V1LayerParameter.LayerType"), ("blobs", 6, "BlobProto*"),
                  ("include", 32, "NetStateRule*"), ("exclude", 33, "NetStateRule*")):
        _add_field(v1, *field)
    for pname, (mname, number, v1_number) in _LAYER_PARAMS.items():
        _add_field(layer, pname, number, mname)
        if v1_number is not None:
            _add_field(v1, pname, v1_number, mname)
    net = fd.message_type.add(name="NetParameter")
    for field in (("name", 1, "string"), ("layers", 2, "V1LayerParameter*"), ("input", 3, "string*"),
                  ("input_dim", 4, "int32*"), ("input_shape", 8, "BlobShape*"), ("layer", 100, "LayerParameter*")):
        _add_field(net, *field)
    return fd


def _classes():
    pool = descriptor_pool.DescriptorPool()
    pool.Add(_file())
    get = getattr(message_factory, "GetMessageClass", None)
    if get is None:  # protobuf 4.21: the factory object's API
        factory = message_factory.MessageFactory(pool)
        get = factory.GetPrototype
    return tuple(get(pool.FindMessageTypeByName(f"{_PACKAGE}.{n}")) for n in ("NetParameter", "BlobProto", "BlobShape"))


NetParameter, BlobProto, BlobShape = _classes()

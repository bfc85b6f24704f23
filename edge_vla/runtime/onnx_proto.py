"""The few ONNX protobuf messages and fields the runtime's graph rewrites touch, without the `onnx` package.

The robot side has onnxruntime and its dependency protobuf but not `onnx` (pyproject: the robot-side
runtime stays small). The message classes below are built from a hand-written subset of onnx.proto (field
numbers as upstream); protobuf keeps every field not declared here as an unknown field and writes it back
unchanged, so a parse -> edit -> serialize round trip preserves the rest of the model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto
_OPT, _REP = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED

# message -> [(field, number, label, type or message name)]
_SCHEMA: dict[str, list[tuple[str, int, int, int | str]]] = {
    "TensorProto": [("dims", 1, _REP, _F.TYPE_INT64), ("data_type", 2, _OPT, _F.TYPE_INT32),
                    ("float_data", 4, _REP, _F.TYPE_FLOAT), ("int64_data", 7, _REP, _F.TYPE_INT64),
                    ("name", 8, _OPT, _F.TYPE_STRING), ("raw_data", 9, _OPT, _F.TYPE_BYTES),
                    ("data_location", 14, _OPT, _F.TYPE_INT32)],
    "AttributeProto": [("name", 1, _OPT, _F.TYPE_STRING), ("f", 2, _OPT, _F.TYPE_FLOAT),
                       ("i", 3, _OPT, _F.TYPE_INT64), ("t", 5, _OPT, "TensorProto"),
                       ("ints", 8, _REP, _F.TYPE_INT64), ("type", 20, _OPT, _F.TYPE_INT32)],
    "NodeProto": [("input", 1, _REP, _F.TYPE_STRING), ("output", 2, _REP, _F.TYPE_STRING),
                  ("name", 3, _OPT, _F.TYPE_STRING), ("op_type", 4, _OPT, _F.TYPE_STRING),
                  ("attribute", 5, _REP, "AttributeProto"), ("domain", 7, _OPT, _F.TYPE_STRING)],
    "ValueInfoProto": [("name", 1, _OPT, _F.TYPE_STRING)],
    "GraphProto": [("node", 1, _REP, "NodeProto"), ("initializer", 5, _REP, "TensorProto"),
                   ("input", 11, _REP, "ValueInfoProto"), ("output", 12, _REP, "ValueInfoProto")],
    "OperatorSetIdProto": [("domain", 1, _OPT, _F.TYPE_STRING), ("version", 2, _OPT, _F.TYPE_INT64)],
    "ModelProto": [("graph", 7, _OPT, "GraphProto"), ("opset_import", 8, _REP, "OperatorSetIdProto")],
}
_PACKAGE = "edge_vla_onnx_subset"

# AttributeProto.type / TensorProto.data_type codes (onnx.proto)
ATTR_FLOAT, ATTR_INT, ATTR_TENSOR, ATTR_INTS = 1, 2, 4, 7
FLOAT, INT32, INT64, FLOAT16 = 1, 6, 7, 10
_NP = {FLOAT: np.float32, INT32: np.int32, INT64: np.int64, FLOAT16: np.float16}
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


def _build() -> dict[str, Any]:
    fd = descriptor_pb2.FileDescriptorProto(name=f"{_PACKAGE}.proto", package=_PACKAGE, syntax="proto2")
    for msg, fields in _SCHEMA.items():
        m = fd.message_type.add(name=msg)
        for name, number, label, typ in fields:
            f = m.field.add(name=name, number=number, label=label)
            if isinstance(typ, str):
                f.type, f.type_name = _F.TYPE_MESSAGE, f".{_PACKAGE}.{typ}"
            else:
                f.type = typ
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return {msg: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{msg}")) for msg in _SCHEMA}


_CLASSES = _build()
ModelProto = _CLASSES["ModelProto"]
NodeProto = _CLASSES["NodeProto"]
TensorProto = _CLASSES["TensorProto"]


def load_model(data: bytes) -> Any:
    model = ModelProto()
    model.ParseFromString(data)
    return model


def to_array(t: Any) -> np.ndarray | None:
    """A small constant's value (raw_data or the typed fields), or None for a type the rewrites do not read."""
    dtype = _NP.get(t.data_type)
    if dtype is None or t.data_location == EXTERNAL:
        return None
    shape = tuple(t.dims)
    if t.raw_data:
        return np.frombuffer(t.raw_data, dtype=dtype).reshape(shape)
    if t.data_type == FLOAT:
        return np.asarray(t.float_data, dtype=np.float32).reshape(shape)
    if t.data_type == INT64:
        return np.asarray(t.int64_data, dtype=np.int64).reshape(shape)
    return None


def from_array(arr: np.ndarray, name: str) -> Any:
    code = {np.dtype(v): k for k, v in _NP.items()}[arr.dtype]
    return TensorProto(name=name, dims=list(arr.shape), data_type=code, raw_data=np.ascontiguousarray(arr).tobytes())


def make_node(op_type: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs: float | int) -> Any:
    node = NodeProto(op_type=op_type, input=inputs, output=outputs, domain=domain)
    for key, value in sorted(attrs.items()):
        if isinstance(value, float):
            node.attribute.add(name=key, f=value, type=ATTR_FLOAT)
        else:
            node.attribute.add(name=key, i=int(value), type=ATTR_INT)
    return node

"""A large model's ONNX file written without torch's exporter holding its weights: the graph is exported without
them, then each weight is streamed into the file on its own. torch.onnx.export peaks at ~3.2x the weights above the
model itself (folded copies, the C++ proto, its serialized bytes: measured on ViT-B), which alone broke ViT-L's
memory budget for the teacher's file. The cost: weight transposes are not folded into the file (onnxruntime folds
them when it loads it), so this is for files that are measured and timed, not shipped.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

ALIGN, ALIGN_ABOVE = 4096, 2**20  # external tensors of 1 MiB or more start on a page boundary (as onnx aligns them)


class NotLean(Exception):
    """The model's graph does not take its weights by their state-dict names (e.g. fused BatchNorm)."""


def export_lean(model: nn.Module, path: Path, sample: torch.Tensor, *, opset: int, axes, mode, external: bool) -> None:
    """Write `path` (and `path`.data when `external`) with the weights appended one tensor at a time."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (sample,), str(path), dynamo=False, opset_version=opset, training=mode,
                          input_names=["input"], output_names=["logits"], dynamic_axes=axes,
                          export_params=False, do_constant_folding=False)
    head = onnx.load(str(path))
    onnx.checker.check_model(head)  # the graph alone, the weights still declared as its inputs
    tensors = model.state_dict()
    names = [i.name for i in head.graph.input if i.name != "input"]
    missing = [n for n in names if n not in tensors or tensors[n].dtype != torch.float32]
    if missing:
        raise NotLean(f"graph inputs that are not float32 state-dict tensors: {', '.join(missing[:3])}")
    keep = [i for i in head.graph.input if i.name == "input"]
    head.graph.ClearField("input")
    head.graph.input.extend(keep)  # the weights are constants now
    values = _fold_transposes(head, names)
    arrays = ((out, _array(tensors[n], perm)) for n, (out, perm) in values.items())  # one tensor at a time
    if external:
        _external(head, path, arrays)
        return
    with open(path, "wb") as f:
        f.write(head.SerializeToString())
        for name, arr in arrays:  # repeated fields of a message written twice are concatenated when it is read
            t = onnx.numpy_helper.from_array(arr, name)
            f.write(onnx.ModelProto(graph=onnx.GraphProto(initializer=[t])).SerializeToString())


def _array(t: torch.Tensor, perm):
    t = t.detach()
    if perm is not False:
        t = t.permute(*(perm or reversed(range(t.dim()))))
    return t.contiguous().numpy()


def _fold_transposes(head: onnx.ModelProto, names: list[str]) -> dict:
    """{weight: (initializer name, perm or None for a reversal, or False: stored as it is)}. A Transpose whose only
    input is a weight used nowhere else is dropped and the weight stored transposed under its output's name, as the
    plain export's constant folding does: left in, onnxruntime folds it at load and then holds both (ViT-B: a
    session of 2.2x the weights instead of 1.4x)."""
    uses: dict[str, int] = {}
    for n in head.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    weights, out, drop = set(names), {n: (n, False) for n in names}, []
    for node in head.graph.node:
        if node.op_type == "Transpose" and node.input[0] in weights and uses[node.input[0]] == 1:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            out[node.input[0]] = (node.output[0], perm)
            drop.append(node)
    for node in drop:
        head.graph.node.remove(node)
    return out


def _external(head: onnx.ModelProto, path: Path, arrays) -> None:
    data = path.with_name(path.name + ".data")
    with open(data, "wb") as f:
        for name, arr in arrays:
            if arr.nbytes >= ALIGN_ABOVE:
                f.write(b"\0" * (-f.tell() % ALIGN))
            offset = f.tell()
            f.write(arr.tobytes())
            t = head.graph.initializer.add(name=name, dims=list(arr.shape), data_type=onnx.TensorProto.FLOAT,
                                           data_location=onnx.TensorProto.EXTERNAL)
            for k, v in (("location", data.name), ("offset", str(offset)), ("length", str(arr.nbytes))):
                t.external_data.add(key=k, value=v)
    with open(path, "wb") as f:
        f.write(head.SerializeToString())


def _varint(buf, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, span start, payload start, span end) of each field of the message in buf[start:end]."""
    i = start
    while i < end:
        at = i
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 2:
            n, i = _varint(buf, i)
            yield key >> 3, at, i, i + n
            i += n
            continue
        if wire == 0:
            _, i = _varint(buf, i)
        else:  # 1: fixed64, 5: fixed32 (groups are not used by ONNX)
            i += 8 if wire == 1 else 4
        yield key >> 3, at, i, i


GRAPH, INITIALIZER = 7, 5  # ModelProto.graph, GraphProto.initializer
TENSOR_KEEP = {1, 2, 8, 13, 14}  # TensorProto dims, data_type, name, external_data, data_location: no values


def light(path: Path) -> onnx.ModelProto:
    """The model in `path` with every initializer's values left out (names, shapes and types kept): what the graph
    checks read, without parsing the weights (onnx.load holds ~2x a single-file model in memory)."""
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        model, graph = bytearray(), bytearray()
        for field, at, payload, end in _fields(buf, 0, len(buf)):
            if field != GRAPH:
                model += buf[at:end]
                continue
            for gfield, gat, gpayload, gend in _fields(buf, payload, end):
                if gfield != INITIALIZER:
                    graph += buf[gat:gend]
                    continue
                tensor = b"".join(buf[a:e] for fl, a, _, e in _fields(buf, gpayload, gend) if fl in TENSOR_KEEP)
                graph += onnx.GraphProto(initializer=[onnx.TensorProto.FromString(tensor)]).SerializeToString()
    proto = onnx.ModelProto.FromString(bytes(model))
    proto.graph.MergeFromString(bytes(graph))
    return proto

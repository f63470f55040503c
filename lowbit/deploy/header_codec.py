"""The .lowbit header as bytes: canonical JSON, zlib-compressed against a fixed preset
dictionary of the words every header repeats.

Why: a 1-bit ResNet-20 holds ~40 KB of content, and its header (~22 KB of JSON: recipe,
layer table, per-quantizer state, layout) compressed on its own still cost ~2.6 KB once
base64-encoded into the safetensors metadata: 6.5% on top of the theoretical size.
Format 3 stores the compressed bytes raw as a uint8 tensor and primes zlib with the
vocabulary below (key names, the usual spec and QAT settings, zoo layer names), which
removes most of the cost a small header pays for its first occurrence of each word.

The dictionary is part of format 3: changing one byte of it makes every format-3 file
unreadable, so a new dictionary needs a new format version (and this one kept for
reading).
"""
from __future__ import annotations

import base64
import json
import zlib
from typing import Any

_WORDS_V3 = (
    '{"format":"lowbit","version":3,"arch":{"name":"resnet20","kwargs":{}},"recipe":{"name":"',
    '","description":"QAT: ', " weights, float activations, 30 epochs; first/last layer 8-bit LSQ",
    '"weights":{"bits":4,"signed":true,"symmetric":true,"per_channel":true,"ch_axis":0,"grid":"midtread",',
    '"estimator":"mse","estimator_options":{},"quantizer":"uniform","quantizer_options":{}},',
    '"activations":{"bits":4,"signed":false,"symmetric":false,"per_channel":false,"ch_axis":0,"grid":"midrise",',
    '"fold_bn":true,"quantize_adds":false,"add_bits":8,"first_last_bits":8,"overrides":[{"pattern":"*","a_bits":32}],',
    '"keep_float":[],"calibration":{"samples":1024,"batch_size":128,"seed":0},"steps":[{"calibrate":{}},',
    '{"qat":{"epochs":30,"lr":0.001,"weight_decay":5e-05,"batch_size":128,"steps_per_epoch":0,"val_samples":5000,',
    '"optimizer":"sgd","momentum":0.9,"schedule":"cosine","warmup":0.0,"freeze_bn_after":-1,"train_bn":true,',
    '"quantizer_lr":0.0,"bn_momentum":0.1,"augment":"auto","kd":{"temperature":4.0,"weight":0.5}}}]},',
    '"layers":[{"name":"conv1","kind":"Conv2d","params":432,"macs":442368,"w_bits":8,"a_bits":32,"quantizer":"lsq"},',
    '{"name":"layer1.0.conv1","kind":"Conv2d","params":2304,"macs":2359296,"w_bits":4,"a_bits":4,"quantizer":"',
    '{"name":"fc","kind":"Linear","params":640,"macs":640,"w_bits":8,"a_bits":8,"quantizer":"',
    'binaryconnect","xnor","twn","ttq","kmeans","inq","hwgq","lqnet","ul2q","dorefa","pact","lsq","uniform"',
    '"quantizers":{"net.conv1.weight_quantizer":{"bits":8,"signed":true,"enabled":true,"calibrated":true,',
    '"spec":{"bits":8,"signed":true,"symmetric":true,"per_channel":true,"ch_axis":0,"grid":"midtread"},"method":"lsq"},',
    '"net.act_quant_0":{"bits":8,"signed":false,"enabled":false,"calibrated":true,"spec":{"bits":8,"signed":false,',
    '"symmetric":false,"per_channel":false,"ch_axis":0,"grid":"midtread"},"method":"uniform"},"kind":"codebook"',
    '"net.layer1.0.conv1.weight_quantizer":{"bits":2,"signed":true,"enabled":true,"calibrated":true,',
    '"float_weights":[],"layout":{"codes":[["net.conv1.module.weight",[16,3,3,3],8,-127],',
    '["net.layer1.0.conv1.module.weight",[16,16,3,3],1,-1],["net.layer2.0.conv1.module.weight",[32,16,3,3],2,-2],',
    '["net.layer3.0.conv1.module.weight",[64,32,3,3],4,-8],["net.fc.module.weight",[10,64],8,-127]],',
    '"floats":[["net.conv1.module.bias",[16]],["net.conv1.weight_quantizer.scale",[16,1,1,1]],',
    '["net.layer1.0.conv2.module.bias",[16]],["net.layer1.0.conv2.weight_quantizer.scale",[16,1,1,1]],',
    '["net.layer2.1.conv1.module.bias",[32]],["net.layer2.1.conv1.weight_quantizer.centroids",[32,1,1,1]],',
    '["net.layer3.2.conv2.module.bias",[64]],["net.layer3.2.conv2.weight_quantizer.scale",[64,1,1,1]],',
    '["net.fc.module.bias",[10]],["net.fc.weight_quantizer.scale",[10,1]],',
    '["net.act_quant_1.scale",[1]],["net.act_quant_1.zero_point",[1]]]},',
    '"metrics":{"top1":91.73,"float_top1":91.73},"sha256":"',
)
DICTIONARY_V3 = "".join(_WORDS_V3).encode()


# What a header may inflate to. Fixed rather than a multiple of the file size: a header is
# ~1 KB per layer whatever the weights weigh, so a file of small layers can honestly carry a
# header larger than its tensors. 64 MiB is ~60,000 layers, far past any network, and it caps
# what a crafted file (a few hundred KB of deflate inflate to gigabytes) makes load allocate
# before anything has been checked.
MAX_HEADER_BYTES = 64 << 20
# How deep the header's JSON may nest. A real header nests ~8 levels (recipe → steps → qat →
# kd); a deeper one would make the parser, the checksum's re-encoding or the recipe reader
# overflow the stack (RecursionError) instead of failing with a named error.
MAX_DEPTH = 64


def encode(header: dict[str, Any]) -> bytes:
    """Compressed canonical JSON (compact separators; key order as given)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, zdict=DICTIONARY_V3)
    return packer.compress(json.dumps(header, separators=(",", ":")).encode()) + packer.flush()


def decode(blob: bytes) -> dict[str, Any]:
    """Inverse of encode; raises ValueError (or zlib.error) on damaged, oversized or too deeply
    nested bytes."""
    return _parse(_inflate(blob, zlib.decompressobj(zdict=DICTIONARY_V3)))


def decode_legacy(text: str) -> dict[str, Any]:
    """The header of formats 1 and 2 (base64 of zlib-compressed JSON, no preset dictionary),
    under the same bounds as :func:`decode`; raises ValueError (or zlib.error)."""
    return _parse(_inflate(base64.b64decode(text), zlib.decompressobj()))


def _inflate(blob: bytes, unpacker: Any) -> bytes:
    """Decompress at most MAX_HEADER_BYTES, 1 MiB at a time: the bound holds while inflating
    (memory never holds more than the bound), not after."""
    chunk, parts, size, data = 1 << 20, [], 0, blob
    while not unpacker.eof:
        part = unpacker.decompress(data, chunk)
        size += len(part)
        if size > MAX_HEADER_BYTES:
            raise ValueError(f"the header inflates to more than {MAX_HEADER_BYTES >> 20} MiB (a decompression bomb "
                             "or a damaged file)")
        parts.append(part)
        data = unpacker.unconsumed_tail
        if not data and len(part) < chunk:  # all input read and no output held back
            break
    if not unpacker.eof:
        raise ValueError("the compressed header is truncated")
    return b"".join(parts)


def _parse(text: bytes) -> dict[str, Any]:
    try:
        header = json.loads(text)
    except RecursionError:
        raise ValueError("the header's JSON is nested too deeply to parse") from None
    if not isinstance(header, dict):
        raise ValueError(f"the header is not a JSON object (it is a {type(header).__name__})")
    _check_depth(header)
    return header


def _check_depth(value: Any) -> None:
    """Refuse nesting deeper than MAX_DEPTH, walking with an explicit stack (no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"the header's JSON nests deeper than {MAX_DEPTH} levels")
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))

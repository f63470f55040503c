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


def encode(header: dict[str, Any]) -> bytes:
    """Compressed canonical JSON (compact separators; key order as given)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, zdict=DICTIONARY_V3)
    return packer.compress(json.dumps(header, separators=(",", ":")).encode()) + packer.flush()


def decode(blob: bytes) -> dict[str, Any]:
    """Inverse of encode; raises ValueError (or zlib.error) on damaged bytes."""
    unpacker = zlib.decompressobj(zdict=DICTIONARY_V3)
    text = unpacker.decompress(blob) + unpacker.flush()
    if not unpacker.eof:
        raise ValueError("the compressed header is truncated")
    header = json.loads(text)
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header

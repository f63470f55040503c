"""Quantizers trained with the network (QAT): each kind is one module here plus one entry
in :mod:`lowbit.quant.registry`. They train in their own parametrisation and hand back a
plain :class:`~lowbit.quant.quantizer.UniformQuantizer` when training ends (``deploy``),
which is what artifacts, the ONNX exporter and every runtime read."""

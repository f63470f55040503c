"""Quantization-aware training: one loop over the QuantModel (lowbit.qat.engine); the
quantizer kinds that differ between LSQ, PACT, DoReFa, μL2Q live in lowbit.quant.learned."""
from lowbit.qat.engine import QATConfig, train_qat

__all__ = ["QATConfig", "train_qat"]

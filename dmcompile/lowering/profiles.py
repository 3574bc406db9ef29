"""Target profiles: what a runtime executes natively decides how a plan is lowered."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TargetProfile:
    """Quantization formats a backend runs with integer kernels."""

    name: str
    activation_dtype: str  # "uint8" (asymmetric) or "int8" (symmetric)
    weight_bits: tuple[int, ...]
    weight_per_channel: bool
    activation_bits: tuple[int, ...]  # activation widths with integer kernels
    integer_ops: dict  # float op type -> the fused integer op types ONNX Runtime may turn it into

    @property
    def activation_symmetric(self) -> bool:
        return self.activation_dtype == "int8"


# ort-cpu: uint8 asymmetric activations per tensor, int8 symmetric per-channel weights, int32 bias.
# Measured (DESIGN.md): with uint8 activations ONNX Runtime's x86 kernels fuse every Conv;
# int8 activations leave many in float.
ORT_CPU = TargetProfile(
    name="ort-cpu",
    activation_dtype="uint8",
    weight_bits=(4, 8),  # 4-bit: packed on disk, int8 grid in memory (int8 kernels)
    weight_per_channel=True,
    activation_bits=(8,),
    integer_ops={"Conv": ("QLinearConv",), "Gemm": ("QGemm",),
                 "MatMul": ("QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger")},
)

PROFILES = {ORT_CPU.name: ORT_CPU}

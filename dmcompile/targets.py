"""Target profiles: what a runtime executes natively decides how a plan is lowered.

A profile is data plus one rule, :meth:`TargetProfile.placement`: which activation tensors
are quantized and which consumers read them quantized. Calibration records exactly the
tensors the placement names; the QDQ pass inserts exactly those. Adding a target means
adding a profile here and, if its runtime is new, a backend (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ORT_CPU", "PROFILES", "TargetProfile", "get_profile"]


@dataclass(frozen=True)
class TargetProfile:
    """Quantization formats a backend runs with integer kernels.

    activation_dtype: "uint8" (asymmetric, per tensor) or "int8" (symmetric).
    weight_bits: widths stored natively (4: packed two per byte, run on int8 kernels).
    activation_bits: activation widths with integer kernels.
    quantize_conv_outputs: also quantize every Conv output (ONNX Runtime fuses
    DQ -> Conv -> Q into QLinearConv only when the output is quantized).
    integer_ops: float op type -> the integer op types the backend may turn it into.
    backend: the backend module that turns lowered graphs into engines.
    """

    name: str
    activation_dtype: str
    weight_bits: tuple[int, ...]
    weight_per_channel: bool
    activation_bits: tuple[int, ...]
    quantize_conv_outputs: bool
    integer_ops: dict
    backend: str

    @property
    def activation_symmetric(self) -> bool:
        return self.activation_dtype == "int8"

    def placement(self, model, layers) -> dict[str, list[tuple[str, int]]]:
        """Quantized activation tensor -> the (node name, input index) pairs that read it
        quantized, for the quantizable ``layers`` (objects with ``node`` and ``weight``) of
        the ONNX ``model``, in graph order. Input 0 of every layer, input 1 of activation x
        activation MatMuls (attention), and, with ``quantize_conv_outputs``, Conv outputs
        (with no quantized reader of their own unless a later layer reads them)."""
        wanted = {l.node: l for l in layers}
        out: dict[str, list[tuple[str, int]]] = {}
        for node in model.graph.node:
            layer = wanted.get(node.name)
            if layer is None:
                continue
            for i in ([0] if layer.weight else [0, 1]):
                out.setdefault(node.input[i], []).append((node.name, i))
            if self.quantize_conv_outputs and node.op_type == "Conv":
                out.setdefault(node.output[0], [])
        return out

    def quantized_tensors(self, model, layers) -> list[str]:
        """The activation tensors :meth:`placement` quantizes, in graph order."""
        return list(self.placement(model, layers))

    def layer_input_tensors(self, model, layers) -> list[str]:
        """The tensors that layers read quantized (placement without reader-less outputs), in the
        order of their first reader: the activation choices a layer has, for RD curves."""
        pos = {n.name: i for i, n in enumerate(model.graph.node)}
        first = {t: min((pos[n], i) for n, i in readers) for t, readers in self.placement(model, layers).items()
                 if readers}
        return sorted(first, key=first.get)


# ort-cpu: uint8 asymmetric activations per tensor, int8 symmetric per-channel weights, int32
# bias. Measured on x86 (AVX512-VNNI): with uint8 activations ONNX Runtime fuses every Conv,
# with int8 activations many Conv and shared-input MatMul/Gemm stay float.
ORT_CPU = TargetProfile(
    name="ort-cpu",
    activation_dtype="uint8",
    weight_bits=(4, 8),  # 4-bit: packed on disk, int8 grid in memory (int8 kernels)
    weight_per_channel=True,
    activation_bits=(8,),
    quantize_conv_outputs=True,
    integer_ops={"Conv": ("QLinearConv",), "Gemm": ("QGemm",),
                 "MatMul": ("QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger")},
    backend="onnxruntime",
)

PROFILES = {ORT_CPU.name: ORT_CPU}


def get_profile(name: str) -> TargetProfile:
    """The profile called ``name``; KeyError lists the known ones (configs validate first)."""
    return PROFILES[name]

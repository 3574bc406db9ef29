"""Target profiles: what a runtime executes natively decides how a plan is lowered.

A profile is data plus one rule, :meth:`TargetProfile.placement`: which activation tensors
are quantized and which consumers read them quantized. Calibration records exactly the
tensors the placement names; the QDQ pass inserts exactly those. Adding a target means
adding a profile here and, if its runtime is new, a backend (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["OPENVINO_CPU", "ORT_CPU", "PROFILES", "TENSORRT", "TargetProfile", "conv_params_choice", "get_profile"]


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
    quantize_activation_matmuls: quantize the inputs of activation x activation MatMuls
    (attention's Q.K^T and attn.V); when False they stay float.
    packed_weight_bits: widths stored packed on disk (two 4-bit values per byte); others are
    stored on the int8 grid, one byte per weight.
    quantize_bias: int32 biases with scale s_x * s_w (ONNX Runtime folds them into its fused
    kernels); False keeps them float, as TensorRT's explicit quantization wants.
    weight_only_ops: op type -> widths stored natively as weight-only blocks (float activations,
    the input not quantized): TensorRT's INT4 MatMul/Gemm. A width in ``packed_weight_bits`` that a
    layer's op type has no native form for is stored on the int8 grid (one byte per weight).
    float16: the engines compute in FP16 outside the quantized ops (strongly typed graphs).
    quantize_residual_skip: a residual Add right after a quantized Conv gets Q/DQ on its other
    (skip) input, so TensorRT fuses the Add into the Conv with an int8 residual.
    family_default_float: the model family's ``default_float`` modules (time embeddings, first and
    last convs, ...: ``frontend/family.py``) stay float unless an override names the layer, its
    module or a module prefix (op-type and ``*`` rules do not reach them).
    weight_grid_bits: the widest weight grid the integer kernels multiply without overflow; wider
    widths are rounded to it (stored and counted at their width). x86 int8 kernels without VNNI
    (AVX2, AVX-512 without VNNI) multiply uint8 activations by int8 weights with VPMADDUBSW, which
    adds pairs of products into int16 and saturates: 2 x 255 x 127 > 32767. With weights in
    [-63, 63] no pair can (ONNX Runtime's ``reduce_range``; measured on an AVX2-only EPYC, digits16
    W8A8: the fused engine 7.2% from fp32 with the 8-bit grid, 1.6% with the 7-bit one, as the
    simulated model).
    scales_in_engines: each engine carries its groups' activation scales (compiled in), so there
    is one engine per group, or per run of merged groups (``--max-engines``); otherwise groups
    share engines and feed them their scales.
    scalar_group_inputs: a target whose engines carry their scales (``scales_in_engines``) may
    instead run every group on one engine fed per-group scalars (``lowering/affine.py``) when
    the build asks (``shared_engine``).
    constant_conv_params: where groups share an engine, give each Conv input one zero point for all
    groups and add Conv biases in float after the output, so that every integer Conv sees a
    constant input zero point and bias: ONNX Runtime then runs its symmetric int8 convolution
    (weights prepacked with the bias folded in, requantization fused) instead of the generic
    QGEMM + requantize path a fed zero point or int32 bias sends it to (lowering/qdq.py).
    float_precisions: the precisions the runtime may run the layers left float in (the build's
    ``float_precision``, the first the default; OpenVINO takes bf16 as a compile hint).
    """

    name: str
    activation_dtype: str
    weight_bits: tuple[int, ...]
    weight_per_channel: bool
    activation_bits: tuple[int, ...]
    quantize_conv_outputs: bool
    integer_ops: dict
    backend: str
    quantize_activation_matmuls: bool = True
    packed_weight_bits: tuple[int, ...] = (4,)
    quantize_bias: bool = True
    weight_only_ops: dict = dataclasses.field(default_factory=dict)
    float16: bool = False
    quantize_residual_skip: bool = False
    family_default_float: bool = False
    scales_in_engines: bool = False
    weight_grid_bits: int = 8
    constant_conv_params: bool = False
    scalar_group_inputs: bool = False
    float_precisions: tuple[str, ...] = ("f32",)

    @property
    def activation_symmetric(self) -> bool:
        return self.activation_dtype == "int8"

    def placement(self, model, layers, weight_only: set[str] | None = None) -> dict[str, list[tuple[str, int]]]:
        """Quantized activation tensor -> the (node name, input index) pairs that read it
        quantized, for the quantizable ``layers`` (objects with ``node`` and ``weight``) of
        the ONNX ``model``, in graph order. Input 0 of every layer, input 1 of activation x
        activation MatMuls (attention; with ``quantize_activation_matmuls``, else neither input),
        and, with ``quantize_conv_outputs``, Conv outputs
        (with no quantized reader of their own unless a later layer reads them); with
        ``quantize_residual_skip``, the skip input of each Add that follows a quantized Conv. Layers in
        ``weight_only`` (nodes whose weight is stored weight-only, see :meth:`weight_only`) read
        their input in float."""
        wanted = {l.node: l for l in layers if self.quantizes(l)}
        weight_only = weight_only or set()
        out: dict[str, list[tuple[str, int]]] = {}
        for node in model.graph.node:
            layer = wanted.get(node.name)
            if layer is None:
                continue
            if node.name not in weight_only:
                for i in ([0] if layer.weight else [0, 1]):
                    out.setdefault(node.input[i], []).append((node.name, i))
            if self.quantize_conv_outputs and node.op_type == "Conv":
                out.setdefault(node.output[0], [])
        if self.quantize_residual_skip:
            conv_out = {n.output[0] for n in model.graph.node if n.name in wanted and n.op_type == "Conv"}
            data = float_input_values(model)
            for node in model.graph.node:
                if node.op_type == "Add" and len(node.input) == 2 and \
                        (node.input[0] in conv_out) != (node.input[1] in conv_out):
                    skip = 1 if node.input[0] in conv_out else 0
                    # a residual carries the sample's data; the time embedding added after conv1
                    # (computed from the timestep alone) is a broadcast bias, not a skip
                    if node.input[skip] in data:
                        out.setdefault(node.input[skip], []).append((node.name, skip))
        return out

    def quantizes(self, layer) -> bool:
        """Whether this target quantizes ``layer`` at all (weighted layers always; attention's
        activation x activation MatMuls only with ``quantize_activation_matmuls``)."""
        return bool(layer.weight) or self.quantize_activation_matmuls

    def grid_bits(self, bits: int) -> int:
        """The grid a ``bits``-wide weight is rounded to on this target (``weight_grid_bits``)."""
        return min(int(bits), self.weight_grid_bits)

    def storage_bits(self, bits: int, op_type: str | None = None) -> int:
        """Bits per weight on disk for a ``bits``-wide weight of an ``op_type`` layer (None: any)."""
        if bits <= 4 and 4 in self.packed_weight_bits:
            if not self.weight_only_ops or op_type is None or 4 in self.weight_only_ops.get(op_type, ()):
                return 4
        return 8

    def weight_only(self, op_type: str, bits: int) -> bool:
        """Whether a ``bits``-wide weight of an ``op_type`` layer runs weight-only (its input float)."""
        return bits in self.weight_only_ops.get(op_type, ())

    def quantized_tensors(self, model, layers) -> list[str]:
        """The activation tensors :meth:`placement` quantizes, in graph order; with
        ``quantize_residual_skip`` also every sample-derived input of an Add that a Conv feeds
        (calibration records them all: which one is the skip depends on which Convs a build
        quantizes)."""
        out = list(self.placement(model, layers))
        if self.quantize_residual_skip:
            convs = {n.output[0] for n in model.graph.node if n.op_type == "Conv"}
            data = float_input_values(model)
            for n in model.graph.node:
                if n.op_type == "Add" and len(n.input) == 2 and any(i in convs for i in n.input):
                    out += [i for i in n.input if i in data and i not in out]
        return out

    def layer_input_tensors(self, model, layers) -> list[str]:
        """The tensors that layers read quantized (placement without reader-less outputs), in the
        order of their first reader: the activation choices a layer has, for RD curves."""
        pos = {n.name: i for i, n in enumerate(model.graph.node)}
        names = {l.node for l in layers}  # a residual Add reads its skip quantized but is no layer
        first = {t: min((pos[n], i) for n, i in readers if n in names)
                 for t, readers in self.placement(model, layers).items() if any(n in names for n, _ in readers)}
        return sorted(first, key=first.get)


METADATA_OPS = ("Shape", "Size")  # their outputs describe a tensor, they do not carry its values


def float_input_values(model) -> set[str]:
    """Values computed from a float graph input (the sample, text embeddings), through any op but
    METADATA_OPS: a residual's skip, and what the FP16 pass types FP16."""
    inits = {i.name for i in model.graph.initializer}
    data = {i.name for i in model.graph.input if i.type.tensor_type.elem_type == 1 and i.name not in inits}
    for n in model.graph.node:
        if n.op_type not in METADATA_OPS and any(i in data for i in n.input):
            data.update(n.output)
    return data


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
    weight_grid_bits=7,  # u8 x s8 without VNNI saturates otherwise (see above)
    constant_conv_params=True,
)

# openvino-cpu: the QDQ graph OpenVINO's low-precision transformations turn into u8 x i8
# Convolution / FullyConnected kernels. Measured with OpenVINO 2026.4 on x86 (AVX512-VNNI,
# ddpm-cifar10-32, `bench_openvino.py placement`): Conv outputs not quantized (quantized, each
# keeps an extra FakeQuantize: 0.73x instead of 0.53x ORT fp32 at batch 1), attention's activation
# MatMuls float (quantized, they stay FakeQuantize + float MatMul: 0.53x instead of 0.42x at batch
# 1), uint8 activations (with int8 symmetric ones OpenVINO's output is 0.72 away from ONNX
# Runtime's on the same graph). 4-bit weights
# run on the int8 grid: OpenVINO runs an int4 Conv weight in bf16 and an int4 MatMul weight as
# weight-only i4 (float activations), not as int8 kernels; ONNX's packed int4 type needs opset 21,
# so they are stored one byte each.
OPENVINO_CPU = TargetProfile(
    name="openvino-cpu",
    activation_dtype="uint8",
    weight_bits=(4, 8),
    weight_per_channel=True,
    activation_bits=(8,),
    quantize_conv_outputs=False,
    integer_ops={"Conv": ("Convolution",), "Gemm": ("FullyConnected",), "MatMul": ("FullyConnected", "MatMul")},
    backend="openvino",
    quantize_activation_matmuls=False,
    packed_weight_bits=(),
    scales_in_engines=True,
    weight_grid_bits=7,  # oneDNN's u8 x s8 kernels without VNNI saturate as ONNX Runtime's do
    scalar_group_inputs=True,
    float_precisions=("f32", "bf16"),
)

# tensorrt: TensorRT's explicit quantization (TensorRT >= 10, strongly typed networks), from its
# developer guide and onnx-tensorrt's importers; never run in this project's environment (no
# TensorRT builder can be installed here). Symmetric int8 activations per tensor, per-channel
# int8 weights, float biases; Q/DQ only on the inputs of Conv / Gemm / MatMul, and on the skip
# input of a residual Add after a quantized Conv (TensorRT fuses the Add into that Conv); attention's activation MatMuls float so its fused
# attention kernel survives; FP16 everywhere else. 4-bit weights: INT4 weight-only blocks for
# MatMul / Gemm (activations FP16), the only INT4 form TensorRT has; a 4-bit Conv weight is stored
# and run INT8 (its values still on the 4-bit grid).
TENSORRT = TargetProfile(
    name="tensorrt",
    activation_dtype="int8",
    weight_bits=(4, 8),
    weight_per_channel=True,
    activation_bits=(8,),
    quantize_conv_outputs=False,
    integer_ops={"Conv": ("Convolution int8",), "Gemm": ("MatrixMultiply int8", "MatrixMultiply int4 weight-only"),
                 "MatMul": ("MatrixMultiply int8", "MatrixMultiply int4 weight-only")},
    backend="tensorrt",
    quantize_activation_matmuls=False,
    quantize_bias=False,
    weight_only_ops={"MatMul": (4,), "Gemm": (4,)},
    float16=True,
    quantize_residual_skip=True,
    scales_in_engines=True,
    family_default_float=True,  # demoDiffusion's / ModelOpt's INT8 recipe (frontend/unet2d.py)
)

PROFILES = {p.name: p for p in (ORT_CPU, OPENVINO_CPU, TENSORRT)}


def get_profile(name: str) -> TargetProfile:
    """The profile called ``name``; KeyError lists the known ones (configs validate first)."""
    return PROFILES[name]


def conv_params_choice(setting: bool | str) -> tuple[bool, str]:
    """Whether a shared ort-cpu engine gets constant Conv parameters (``BuildConfig.constant_conv_params``:
    True, False or ``"auto"``), and why. "auto" asks the build machine's CPU: MLAS gives its generic
    int8 GEMM an AMX kernel but not its symmetric int8 convolution, so on AMX the generic path a fed
    zero point takes is the faster one (SD 1.5 UNet: QLinearConv 407 vs 770 ms per call), elsewhere
    the symmetric one (AMD EPYC, SD 1.5 Conv shapes: 1.27-1.40x; benchmarks/bench_qlinearconv.py)."""
    if isinstance(setting, bool):
        return setting, f"--conv-params {'constant' if setting else 'per-group'}"
    from dmruntime import bench  # looked up at call time: tests stand in another CPU

    if "amx_int8" in bench.cpu_info()[1]:
        return False, "auto: the build CPU has AMX (ONNX Runtime's generic int8 Conv runs on it, its symmetric one does not)"
    return True, "auto: the build CPU has no AMX (ONNX Runtime's symmetric int8 Conv is the faster there)"

"""INT8 ONNX: onnxruntime's static QDQ quantization calibrated on a (relay-aware) set, and dynamic INT8.

Static (``quantize_static``): the fp32 ONNX is first pre-processed (``quant_pre_process``: symbolic
shape inference and ORT graph optimisation, as onnxruntime's guide asks), then quantized in QDQ
format with per-channel symmetric int8 weights and uint8 activations (ORT's recommended U8S8 for
x86/ARM CPUs), activation ranges read off a :class:`CalibrationDataReader` that replays the
calibration set. Dynamic (``quantize_dynamic``): int8 weights, activations quantized at run time,
no calibration; only MatMul/Gemm/Attention (onnxruntime's ``ConvInteger`` CPU kernel takes uint8
weights only, so convolutions stay fp32).

Both return an :class:`~relaydiff.export.base.Artifact` run and checked by the ordinary ONNX exporter,
with the ORT Mobile file (``.ort``, onnxruntime's ``convert_onnx_models_to_ort``) beside the ``.onnx``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from relaydiff.core.metrics import Tolerance
from relaydiff.export.base import Artifact, ExportError, tool_versions
from relaydiff.quantize.calibration import CalibrationSet, Inputs

METHODS = ("static", "dynamic")
_QTYPES = ("QInt8", "QUInt8", "QInt16", "QUInt16")  # 16-bit activations: W8A16, as NPUs (e.g. QNN) run it
# INT8 bars against torch fp32, held on inputs drawn like the calibration set (held-out relays, not the
# components' example inputs, which lie outside the calibrated ranges). Measured worst on the tiny random
# preset: unet_step 16.0 dB (static), 18.7 dB (dynamic); vae_decoder 38 dB (dynamic); text_encoder 16.4-17.1 dB.
INT8_TOLERANCES: dict[str, Tolerance] = {
    "unet_step": Tolerance(min_psnr_db=12.0),
    "unet": Tolerance(min_psnr_db=12.0),
    "vae_decoder": Tolerance(min_psnr_db=20.0),
    "text_encoder": Tolerance(min_psnr_db=12.0),
}


@dataclass(frozen=True)
class OnnxInt8Config:
    """Options of one ONNX INT8 quantization."""

    method: str = "static"  # "static" (QDQ, calibrated) or "dynamic" (weights only, activations at run time)
    per_channel: bool = True  # per-output-channel weight scales
    activation_type: str = "QUInt8"  # static: activation dtype (ORT recommends uint8 activations on CPU)
    weight_type: str = "QInt8"  # weight dtype (symmetric int8)
    calibrate_method: str = "MinMax"  # static: onnxruntime CalibrationMethod name ("MinMax", "Entropy", "Percentile")
    preprocess: bool = False  # run onnxruntime's quant_pre_process first (off: its shape inference breaks the dynamo graphs here)
    write_ort: bool = True  # also write the ORT Mobile format (.ort) and its required-operators config, as for fp32
    # static: nodes computed from these inputs alone (with weights) stay float. The timestep path (sinusoidal
    # embedding, time MLP, per-block projections) is vector-sized, and uint8 steps of the timestep (2.5 over
    # [1, 641]) scramble the high-frequency sinusoids: on the trained family it cost ~15 dB of denoiser PSNR.
    float_inputs: tuple[str, ...] = ("timestep",)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("activation_type", "weight_type"):
            if getattr(self, name) not in _QTYPES:
                raise ValueError(f"{name} must be one of {', '.join(_QTYPES)}, got {getattr(self, name)!r}")
        if self.calibrate_method not in ("MinMax", "Entropy", "Percentile"):
            raise ValueError(f"calibrate_method must be MinMax, Entropy or Percentile, got {self.calibrate_method!r}")


class SetReader:
    """onnxruntime ``CalibrationDataReader`` over recorded component inputs (only the names the model takes)."""

    def __init__(self, samples: Sequence[Inputs], names: Sequence[str]) -> None:
        self._samples = samples
        self._names = list(names)
        self._it: Iterator[Inputs] = iter(())
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._it, None)
        return None if x is None else {n: np.ascontiguousarray(x[n]) for n in self._names}

    def rewind(self) -> None:
        self._it = iter(self._samples)

    def __len__(self) -> int:
        return len(self._samples)


def quantize_onnx(
    fp32: Artifact,
    out_dir: str | Path,
    config: OnnxInt8Config | None = None,
    calibration: CalibrationSet | None = None,
) -> Artifact:
    """Quantize the fp32 ONNX artifact ``fp32`` to INT8 and write ``<component>.int8-<method>.onnx`` in ``out_dir``.

    Raises:
        ValueError: static quantization without a calibration set.
        ExportError: onnxruntime failed (its message is quoted).
    """
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    config = config or OnnxInt8Config()
    if fp32.exporter != "onnx" or fp32.precision != "fp32":
        raise ValueError(f"expected an fp32 ONNX artifact, got {fp32.exporter} {fp32.precision}")
    if config.method == "static" and calibration is None:
        raise ValueError("static INT8 quantization needs a calibration set")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{fp32.component}.int8-{config.method}.onnx"
    t0 = time.perf_counter()
    src = out / f"{fp32.component}.int8-{config.method}.src.onnx"
    _untie(fp32.files["onnx"], src)
    try:
        if config.preprocess:
            pre = out / f"{fp32.component}.int8-{config.method}.pre.onnx"
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            src = pre
        if config.method == "static":
            assert calibration is not None
            samples = calibration.for_component(fp32.component)
            reader = SetReader(samples, [s.name for s in fp32.signature.inputs])

            class _Reader(CalibrationDataReader):  # ORT checks isinstance(reader, CalibrationDataReader)
                def get_next(self) -> dict[str, np.ndarray] | None:
                    return reader.get_next()

                def rewind(self) -> None:
                    reader.rewind()

            keep_float = nodes_from_inputs(src, config.float_inputs)
            quantize_static(
                str(src), str(path), _Reader(), quant_format=QuantFormat.QDQ, per_channel=config.per_channel,
                nodes_to_exclude=keep_float,
                activation_type=getattr(QuantType, config.activation_type), weight_type=getattr(QuantType, config.weight_type),
                calibrate_method=getattr(CalibrationMethod, config.calibrate_method),
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            )
        else:
            quantize_dynamic(
                str(src), str(path), per_channel=config.per_channel, weight_type=getattr(QuantType, config.weight_type),
                op_types_to_quantize=["MatMul", "Gemm", "Attention"],
            )
    except Exception as exc:  # onnxruntime.quantization raises many types; quote it
        raise ExportError(f"ONNX INT8 ({config.method}) quantization of {fp32.component!r} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        for suffix in ("pre", "src"):
            (out / f"{fp32.component}.int8-{config.method}.{suffix}.onnx").unlink(missing_ok=True)
    _stamp(path, fp32, config)
    files = {"onnx": path}
    if config.write_ort:  # ORT's converter takes QDQ and dynamic-INT8 graphs as they are (Fixed style fuses QDQ into QLinear ops)
        from relaydiff.export.onnx import convert_to_ort

        files.update(convert_to_ort(path))
    metadata = {
        **{k: v for k, v in fp32.metadata.items() if k in ("family_id", "family_root", "unet_variant", "description")},
        "quantization": {"tool": "onnxruntime.quantization", **dataclasses.asdict(config)},
        "calibration": calibration.summary() if (calibration is not None and config.method == "static") else None,
        "quantize_seconds": round(time.perf_counter() - t0, 3),
        "versions": tool_versions(),
        "fp32_size": src_size(fp32),
        "int8_size": int(path.stat().st_size),
    }
    artifact = Artifact(
        exporter="onnx", component=fp32.component, signature=fp32.signature, files=files,
        runnable=tuple(r for r in ("onnx", "ort") if r in files),
        precision="int8", tolerance=INT8_TOLERANCES.get(fp32.component, Tolerance(min_psnr_db=20.0)), metadata=metadata,
    )
    artifact.write_metadata()
    return artifact


def _untie(src: Path, dst: Path) -> None:
    """Copy an ONNX model, ready for onnxruntime's quantizer.

    Two fixes the dynamo exporter's graphs need: stale ``value_info`` shapes are dropped (the quantizer
    re-infers them; the stale ones made ORT reject the quantized attention MatMuls), and an initializer
    read by several nodes is copied once per reader (ORT's QDQ quantizer refuses shared weights).
    """
    import onnx

    proto = onnx.load(str(src))
    graph = proto.graph
    del graph.value_info[:]
    inits = {i.name: i for i in graph.initializer}
    seen: dict[str, int] = {}
    for node in graph.node:
        for j, name in enumerate(node.input):
            if name not in inits:
                continue
            seen[name] = seen.get(name, 0) + 1
            if seen[name] > 1:
                copy = onnx.TensorProto()
                copy.CopyFrom(inits[name])
                copy.name = f"{name}__use{seen[name]}"
                graph.initializer.append(copy)
                node.input[j] = copy.name
    onnx.save(proto, str(dst))


def nodes_from_inputs(path: str | Path, inputs: Sequence[str]) -> list[str]:
    """Names of the nodes whose every activation input derives from ``inputs`` alone (initializers aside)."""
    import onnx

    if not inputs:
        return []
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    derived, names = set(inputs), []
    for node in graph.node:  # ONNX graphs are topologically sorted
        acts = [i for i in node.input if i and i not in weights]
        if acts and all(i in derived for i in acts):
            derived.update(node.output)
            names.append(node.name)
    return names


def src_size(artifact: Artifact) -> int:
    return int(artifact.path.stat().st_size)


def _stamp(path: Path, fp32: Artifact, config: OnnxInt8Config) -> None:
    """Carry the fp32 model's relaydiff metadata over and add the quantization facts."""
    import json

    import onnx

    src = {p.key: p.value for p in onnx.load(str(fp32.files["onnx"]), load_external_data=False).metadata_props}
    proto = onnx.load(str(path))
    props = {k: v for k, v in src.items() if k.startswith("relaydiff.")}
    props["relaydiff.precision"] = "int8"
    props["relaydiff.quantization"] = json.dumps(dataclasses.asdict(config))
    del proto.metadata_props[:]
    from relaydiff.export.onnx import strip_node_metadata

    strip_node_metadata(proto)
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def session_runner(path: str | Path) -> Any:
    """A callable inputs -> outputs (by name) over one onnxruntime CPU session."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1  # relay evaluation calls many tiny steps; one thread avoids contention
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    inputs = [i.name for i in session.get_inputs()]

    def run(x: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, {n: np.ascontiguousarray(x[n]) for n in inputs}), strict=True))

    return run


def quantized_op_counts(path: str | Path) -> dict[str, int]:
    """Counts of the quantization ops in an ONNX graph (QuantizeLinear, DequantizeLinear, MatMulInteger...)."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        if "quantize" in node.op_type.lower() or "Integer" in node.op_type:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts

"""Would a cheaper form of the shipped CNN make the CNN stage faster? onnxruntime on the belle2-ecl
model in the forms an engineer would try first, on the real CNN inputs of generated belle2-ecl generic
events (nominal background), one thread, the calls ECLEnergyCorrection makes (max_clusters_per_batch):

- `shipped`: the float32 model as shipped;
- `conv_as_gemm`: the two 3x3 convolutions as dense matrix products (the same function: each
  convolution written out as its Toeplitz matrix), i.e. one GEMM per layer instead of a Conv kernel;
- `int8_qdq`, `int8_qoperator`: static int8 quantization (onnxruntime.quantization, activations
  calibrated on the first half of the inputs, weights per channel for QDQ); the CPU has AVX-512 VNNI;
- `int8_dynamic`: dynamic int8 quantization of the weights.

Rates are measured on the second half of the inputs, the variants interleaved in each round and the
median of the rounds quoted, with the deviation of each variant's energies from the shipped model's.

    .venv/bin/python benchmarks/bench_cnn_variants.py [--events 10000] [--rounds 5]
"""
import argparse
import os
import statistics as st
import tempfile
import time

import numpy as np
import onnx
from onnx import helper, numpy_helper

from eclreco.bench import DEFAULT_BATCH, collect_cnn_inputs, make_raw_file
from eclreco.modules.ecl_energy_correction import ECLEnergyCorrection, load_session, shipped_model


def conv_toeplitz(weight: np.ndarray, size: int) -> np.ndarray:
    """The dense matrix [C_out*(S-2)^2, C_in*S^2] of a 3x3 convolution without padding, stride 1, on
    S x S inputs, in the row-major (channel, y, x) order of Flatten."""
    c_out, c_in, k, _ = weight.shape
    out = size - k + 1
    t = np.zeros((c_out, out, out, c_in, size, size), np.float32)
    for y in range(out):
        for x in range(out):
            t[:, y, x, :, y:y + k, x:x + k] = weight
    return t.reshape(c_out * out * out, c_in * size * size)


def convs_as_gemm(src: str, dst: str) -> None:
    """Rewrites Unsqueeze → (Conv → Relu)* → Flatten as Flatten → (Gemm → Relu)*."""
    m = onnx.load(src)
    g = m.graph
    weights = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    by_input = {}
    for n in g.node:
        for i in n.input:
            by_input.setdefault(i, []).append(n)
    convs = [n for n in g.node if n.op_type == "Conv"]
    first = next(n for n in g.node if convs[0].input[0] in n.output)  # the Unsqueeze to [N,1,S,S]
    assert first.op_type == "Unsqueeze", first.op_type
    for c in convs:
        attrs = {a.name: helper.get_attribute_value(a) for a in c.attribute}
        assert attrs.get("pads", [0] * 4) == [0] * 4 and attrs.get("strides", [1, 1]) == [1, 1], attrs
    size = next(i for i in g.input if i.name == "image").type.tensor_type.shape.dim[1].dim_value
    dropped, new, x = {id(first)}, [helper.make_node("Flatten", [first.input[0]], ["gemm_in"], axis=1)], "gemm_in"
    for k, c in enumerate(convs):
        relu = by_input[c.output[0]][0]
        assert relu.op_type == "Relu"
        w, b = weights[c.input[1]], weights[c.input[2]]
        out = size - w.shape[2] + 1
        g.initializer.extend([numpy_helper.from_array(conv_toeplitz(w, size), f"gemm{k}.weight"),
                              numpy_helper.from_array(np.repeat(b, out * out).astype(np.float32), f"gemm{k}.bias")])
        new += [helper.make_node("Gemm", [x, f"gemm{k}.weight", f"gemm{k}.bias"], [f"gemm{k}"], transB=1),
                helper.make_node("Relu", [f"gemm{k}"], [f"gemm{k}.relu"])]
        dropped |= {id(c), id(relu)}
        x, size = f"gemm{k}.relu", out
    flatten = by_input[relu.output[0]][0]
    assert flatten.op_type == "Flatten"
    dropped.add(id(flatten))
    new[-1].output[0] = flatten.output[0]
    nodes = [n for n in g.node if id(n) not in dropped]
    at = next(i for i, n in enumerate(nodes) if flatten.output[0] in n.input)
    del g.node[:]
    g.node.extend(nodes[:at] + new + nodes[at:])
    keep = [i for i in g.initializer if not any(i.name in c.input[1:] for c in convs)]
    del g.initializer[:]
    g.initializer.extend(keep)
    onnx.checker.check_model(m)
    onnx.save(m, dst)


# only the network's layers: the feature arithmetic around them (E_raw scaling, logs, the final
# exp and product) quantized to 8 bits would change the energy itself by up to 100 %
LAYERS = ["Conv", "Gemm", "MatMul"]


def quantized(src: str, dst: str, kind: str, calibration) -> None:
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter({"image": i, "features": f} for i, f in calibration)

        def get_next(self):
            return next(self.it, None)

    if kind == "int8_dynamic":
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, op_types_to_quantize=LAYERS)
    else:
        fmt = QuantFormat.QDQ if kind == "int8_qdq" else QuantFormat.QOperator
        quantize_static(src, dst, Reader(), quant_format=fmt, per_channel=kind == "int8_qdq",
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=LAYERS)
    # load_session needs the model's metadata (detector, feature names), which quantization drops
    m, ref = onnx.load(dst), onnx.load(src)
    if not m.metadata_props:
        m.metadata_props.extend(ref.metadata_props)
        onnx.save(m, dst)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if args.events < 2 * DEFAULT_BATCH or args.rounds < 1:  # a batch to calibrate on and one to time
        ap.error(f"--events must be >= {2 * DEFAULT_BATCH} and --rounds >= 1")
    with tempfile.TemporaryDirectory(prefix="eclreco-bench-cnn-") as tmp:
        raw = os.path.join(tmp, "generic.msgpack")
        make_raw_file(raw, args.events, 1.0)
        src = shipped_model("belle2-ecl")
        shipped, meta = load_session(src, threads=1)
        batches = [b for b in collect_cnn_inputs(raw, args.events, meta["extra_features"]) if b[0].shape[0]]
        calibration, timed = batches[: len(batches) // 2], batches[len(batches) // 2:]
        variants = {"conv_as_gemm": os.path.join(tmp, "conv_as_gemm.onnx")}
        convs_as_gemm(src, variants["conv_as_gemm"])
        for kind in ("int8_qdq", "int8_qoperator", "int8_dynamic"):
            variants[kind] = os.path.join(tmp, f"{kind}.onnx")
            quantized(src, variants[kind], kind, calibration)
        sessions = {"shipped": shipped, **{k: load_session(p, threads=1)[0] for k, p in variants.items()}}
    n = sum(b[0].shape[0] for b in timed)
    step = ECLEnergyCorrection().param("max_clusters_per_batch")

    def run(sess):
        return np.concatenate([sess.run(["energy"], {"image": i[a:b], "features": f[a:b]})[0]
                               for i, f in timed for a, b in ECLEnergyCorrection.call_slices(i.shape[0], step)])

    energies = {k: run(s) for k, s in sessions.items()}  # also the warm-up
    rates = {k: [] for k in sessions}
    for _ in range(args.rounds):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            run(s)
            rates[k].append(n / (time.perf_counter() - t0))
    ref = energies["shipped"]
    per_event = sum(b[0].shape[0] for b in batches) / args.events
    print(f"{n} clusters timed ({per_event:.1f} per event), calls of ≤ {step}, "
          f"median of {args.rounds} interleaved rounds")
    print(f"{'variant':<15} {'clusters/s':>11} {'µs/cluster':>11} {'vs shipped':>11} "
          f"{'|ΔE/E| p50':>11} {'p99':>9} {'max':>9}")
    base = st.median(rates["shipped"])
    for k in sessions:
        r = st.median(rates[k])
        rel = np.abs(energies[k] / ref - 1)
        print(f"{k:<15} {r:>11,.0f} {1e6 / r:>11.3f} {r / base:>11.2f} "
              f"{np.median(rel):>11.1e} {np.percentile(rel, 99):>9.1e} {rel.max():>9.1e}")


if __name__ == "__main__":
    main()

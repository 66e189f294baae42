"""Kernels of eager layer implementations (training.implementation: torch | huggingface), counted op
by op from the PyTorch, transformers and PEFT code they model, and the dtype-aware GEMM shape factor."""
import math

import pytest

from sim.compute import gemm_shape_factor
from sim.efficiency import gpu_efficiency
from sim.hardware import get_gpu
from sim.kernels import LayerKernels
from sim.scenario import scenario_from_mapping

S, B = 2048, 2
T = S * B


def kernels(implementation: str, **finetune) -> LayerKernels:
    data = {"model": "llama2-7b", "cluster": {"topology": "dgx-h100", "nodes": 1, "gpus": 1},
            "training": {"seq_len": S, "global_batch_size": B, "micro_batch_size": B, "precision": "bf16",
                         "implementation": implementation},
            "parallelism": {"recompute": "full", "recompute_early_stop": True}}
    if finetune:
        data["finetune"] = finetune
    sc = scenario_from_mapping(data)
    return LayerKernels(sc.model, sc.plan)


def byname(ks, prefix):
    return [k for k in ks if k.name.startswith(prefix)]


def test_torch_layer_elementwise_bytes():
    h, f, e = 4096, 11008, 2
    k = kernels("torch")
    # RoPE on Q and K: x*cos (r+w), -x2 (half read, half written), cat (r+w), *sin (r+w), add (2r+w)
    rope = byname(k.forward, "rope")
    assert len(rope) == 10
    assert math.fsum(x.bytes for x in rope) == pytest.approx(10 * e * T * (h + h))
    # SiLU (r+w) and the multiply (2r+w) as two kernels, and the attention output's contiguous copy
    assert [x.bytes for x in byname(k.forward, "activation")] == pytest.approx([2 * e * T * f, 3 * e * T * f])
    assert byname(k.forward, "attention_output_copy")[0].bytes == pytest.approx(2 * e * T * h)
    fused = kernels("fused")
    assert len(k.forward) > len(fused.forward)
    # the same GEMMs as the fused layer
    assert [x.flop for x in k.forward if x.kind == "gemm"] == [x.flop for x in fused.forward if x.kind == "gemm"]


def test_huggingface_norm_and_separate_projections():
    h, e = 4096, 2
    k = kernels("huggingface")
    norm = byname(k.forward, "norm1")
    assert len(norm) == 8       # to(fp32), pow, mean, + eps, rsqrt, * rstd, to(bf16), weight *
    # 36 B per value: 6 + 8 + 4 + 8 + 6 bytes through fp32 and 4 for the weight's multiply, plus the rows' scalars
    assert math.fsum(x.bytes for x in norm) == pytest.approx(T * h * (e + 4 + 8 + 4 + 8 + 4 + e + 2 * e) + T * (8 + 8 + 4))
    assert [x.name for x in k.forward if x.kind == "gemm"] == ["q_proj", "k_proj", "v_proj", "out_proj",
                                                              "gate_proj", "up_proj", "mlp_down"]


def test_peft_fp32_adapter_chain():
    h, r, e = 4096, 16, 2
    k = kernels("huggingface", method="lora", rank=r, target_modules=["q"], base_weight_dtype="bf16")
    chain = byname(k.forward, "lora_q")
    assert [x.name.split(".")[1] for x in chain] == ["cast", "A", "B", "scale", "add", "cast_back"]
    cast, a, b = chain[0], chain[1], chain[2]
    assert cast.bytes == pytest.approx(T * h * (e + 4))
    assert a.dtype == b.dtype == "fp32" and a.flop == pytest.approx(2 * T * h * r) and b.shape == (T, h, r)
    # bf16 adapters: no casts, A and B on the tensor cores
    k16 = kernels("huggingface", method="lora", rank=r, target_modules=["q"], base_weight_dtype="bf16",
                  adapter_dtype="bf16")
    assert [x.name.split(".")[1] for x in byname(k16.forward, "lora_q")] == ["A", "B", "scale", "add"]
    # frozen base GEMMs: input gradient only; early stop re-runs up to (not including) the down projection
    assert [x.name for x in k.backward if x.name.startswith("q_proj")] == ["q_proj.dgrad"]
    assert k.recompute_forward[-1].name == "activation.mul"


def test_k_half_scales_with_the_dtype_rate():
    gpu = get_gpu("h100-sxm")
    eff = gpu_efficiency(gpu, "bf16")
    shape = (1 << 20, 256 * gpu.sm_count, 1024)      # whole waves: only the K term differs
    assert gemm_shape_factor(shape, gpu.sm_count, eff) == pytest.approx(1024 / (1024 + eff.gemm_k_half))
    assert gemm_shape_factor(shape, gpu.sm_count, eff, 2.0) == pytest.approx(1024 / (1024 + 2 * eff.gemm_k_half))


def test_flash_attention_runs_the_next_compiled_head_dim():
    # MPT-30B: hidden 7168, 64 heads -> head dim 112, which runs FlashAttention-2's 128 kernel
    model = {"name": "d112", "layers": 2, "hidden": 7168, "heads": 64, "ffn_hidden": 28672, "vocab": 50432,
             "max_seq_len": 8192}
    data = {"model": model, "cluster": {"topology": "dgx-h100", "nodes": 1, "gpus": 1},
            "training": {"seq_len": 8192, "global_batch_size": 1, "micro_batch_size": 1, "precision": "bf16"}}
    sc = scenario_from_mapping(data)
    attention = next(k for k in LayerKernels(sc.model, sc.plan).forward if k.kind == "attention")
    assert attention.flop == pytest.approx(4.0 * 8192 * 8192 * 7168 / 2 * 128 / 112)
    model["hidden"] = 8192                            # head dim 128: no padding
    sc = scenario_from_mapping(data)
    attention = next(k for k in LayerKernels(sc.model, sc.plan).forward if k.kind == "attention")
    assert attention.flop == pytest.approx(4.0 * 8192 * 8192 * 8192 / 2)

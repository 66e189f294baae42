"""Measure LoRA fine-tuning of Llama-2-7B (architecture, random weights) with Hugging Face
transformers + PEFT on one real GPU: step time and peak memory, the way a practitioner runs it
(bf16 base weights, fp32 adapters as PEFT casts them, torch AdamW, gradient checkpointing on or off).
Also records which kernels PyTorch's default SDPA dispatch runs on this GPU. Run on a lent H100:

    PYTHONUNBUFFERED=1 python3 validation/device/measure_hf.py --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from measure_h100 import DEV, H2048, MixedPrecisionAdam, run_guarded


def sdpa_default_kernels() -> dict:
    """Kernel names the default SDPA dispatch launches for a causal bf16 forward + backward."""
    q, k, v = (torch.randn(1, 32, 4096, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        o.sum().backward()
        torch.cuda.synchronize()
    names = sorted({e.name for e in prof.events() if "flash" in e.name.lower() or "cudnn" in e.name.lower()
                    or "fmha" in e.name.lower() or "attention" in e.name.lower()})
    return {"kernels": names[:20]}


def profile_step(step) -> dict:
    """One profiled step: kernels launched, their summed device time, the step's wall time, and the
    kernels that took the most time (is the step host-bound: kernel time well under wall time?)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name[:90], []).append(e.device_time_total / 1e6)
    top = sorted(((sum(v), len(v), k) for k, v in by_name.items()), reverse=True)[:25]
    return {"kernels": len(kernels), "kernel_s": sum(e.device_time_total for e in kernels) / 1e6,
            "profiled_wall_s": wall, "top": [{"name": k, "s": t, "count": n} for t, n, k in top]}


def hf_llama(*, hidden: int, ffn: int, layers: int, heads: int, vocab: int, seq: int, checkpointing: bool):
    """transformers' LlamaForCausalLM (MHA, SDPA attention, untied) with random bf16 weights on the
    GPU, in training mode, with non-reentrant gradient checkpointing when asked."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                         max_position_embeddings=seq, rms_norm_eps=1e-5, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEV):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    return model


def timed_steps(step, steps: int) -> list[float]:
    """Seconds of each ``step()`` after two warm-up steps (CUDA events), the peak memory statistics
    reset after the warm-up."""
    times = []
    for i in range(steps):
        if i == 2:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        a, z = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        z.record()
        z.synchronize()
        if i >= 2:
            times.append(a.elapsed_time(z) / 1e3)
    return times


def peaks() -> dict:
    return {"peak_allocated_bytes": torch.cuda.max_memory_allocated(),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved()}


def lora_run(cfg: dict, steps: int = 5) -> dict:
    """LoRA fine-tuning of Llama-2-7B's architecture with PEFT (fp32 adapters) and torch AdamW."""
    return run_guarded(cfg, lambda row: _lora(cfg, row, steps))


def _lora(cfg: dict, row: dict, steps: int) -> None:
    from peft import LoraConfig, get_peft_model
    model = hf_llama(hidden=4096, ffn=11008, layers=32, heads=32, vocab=32000, seq=4096,
                     checkpointing=cfg["checkpointing"])
    row["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    if cfg["checkpointing"]:
        model.enable_input_require_grads()
    lora = LoraConfig(r=cfg["rank"], lora_alpha=2 * cfg["rank"], target_modules=cfg["targets"],
                      lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    row["trainable_params"] = sum(p.numel() for p in trainable)
    row["adapter_dtypes"] = sorted({str(p.dtype) for p in trainable})
    row["total_params"] = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    b, s = cfg["mbs"], cfg["seq"]
    ids = torch.randint(0, 32000, (b, s), device=DEV)
    torch.cuda.synchronize()
    row["weights_allocated_bytes"] = torch.cuda.memory_allocated()

    def step():
        model(input_ids=ids, labels=ids).loss.backward()    # as Trainer.compute_loss: the outputs are dropped
        opt.step()
        opt.zero_grad(set_to_none=True)
    times = timed_steps(step, steps)
    if cfg.get("profile"):
        row["profile"] = profile_step(step)
    stats = torch.cuda.memory_stats()
    row.update({"step_s": statistics.median(times), "step_s_all": times, **peaks(),
                "alloc_retries": stats.get("num_alloc_retries", 0),
                "tokens_per_s": b * s / statistics.median(times)})


def full_run(cfg: dict, steps: int = 5) -> dict:
    """Full fine-tuning of a transformers LlamaForCausalLM with Megatron-LM's mixed precision (bf16
    weights, fp32 gradient buffers, fp32 master weights and fused AdamW: measure_h100.py's
    MixedPrecisionAdam), so that only the layers' saved tensors differ from the plain-PyTorch runs."""
    return run_guarded(cfg, lambda row: _full(cfg, row, steps))


def _full(cfg: dict, row: dict, steps: int) -> None:
    model = hf_llama(hidden=cfg["hidden"], ffn=cfg["ffn"], layers=cfg["layers"], heads=cfg["heads"],
                     vocab=cfg["vocab"], seq=cfg["seq"], checkpointing=cfg["checkpointing"])
    opt = MixedPrecisionAdam(model)
    row["params"] = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, cfg["vocab"], (cfg["mbs"], cfg["seq"]), device=DEV)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    times = timed_steps(step, steps)
    row.update({"step_s": statistics.median(times), "step_s_all": times, **peaks()})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--profile", action="store_true", help="only profile one step of two runs")
    ap.add_argument("--full", action="store_true", help="only full fine-tuning runs (hf_full.json)")
    args = ap.parse_args()
    import peft
    import transformers
    result = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "peft": peft.__version__},
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        result["sdpa_default"] = sdpa_default_kernels()
    except Exception as exc:  # noqa: BLE001
        result["sdpa_default"] = {"error": repr(exc)}
    print(result, flush=True)
    if args.full:
        result["runs"] = []
        for mbs, ckpt in ((2, False), (4, False), (8, False), (8, True), (16, True)):
            row = full_run({**H2048, "seq": 2048, "mbs": mbs, "checkpointing": ckpt})
            result["runs"].append(row)
            print({k: row.get(k) for k in ("mbs", "checkpointing", "step_s", "peak_allocated_bytes", "error")},
                  flush=True)
            with open(os.path.join(args.out, "hf_full.json"), "w") as f:
                json.dump(result, f, indent=1)
        return
    all_linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    runs = [{"seq": 2048, "mbs": 1, "rank": 16, "targets": all_linear, "checkpointing": True},
            {"seq": 2048, "mbs": 4, "rank": 16, "targets": all_linear, "checkpointing": True},
            {"seq": 4096, "mbs": 2, "rank": 16, "targets": all_linear, "checkpointing": True},
            {"seq": 2048, "mbs": 4, "rank": 8, "targets": ["q_proj", "v_proj"], "checkpointing": True},
            {"seq": 2048, "mbs": 1, "rank": 16, "targets": all_linear, "checkpointing": False},
            {"seq": 2048, "mbs": 2, "rank": 16, "targets": all_linear, "checkpointing": False},
            {"seq": 2048, "mbs": 2, "rank": 8, "targets": ["q_proj", "v_proj"], "checkpointing": False}]
    if args.profile:
        runs = [{**runs[0], "profile": True}, {**runs[1], "profile": True}, {**runs[4], "profile": True}]
    result["runs"] = []
    for cfg in runs:
        row = lora_run({"model": "llama2-7b", **cfg})
        result["runs"].append(row)
        print({k: row.get(k) for k in ("seq", "mbs", "rank", "checkpointing", "step_s", "peak_allocated_bytes",
                                         "peak_reserved_bytes", "trainable_params", "adapter_dtypes", "error")},
              flush=True)
        with open(os.path.join(args.out, "hf_lora_profile.json" if args.profile else "hf_lora.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

"""Build the validation set from the project's reference data (a developer tool; its output is committed).

    python validation/build_runs.py [--reference ../shared/reference/validation/throughput.csv]
                                    [--extra validation/extra_throughput.csv]

Reads every published measured run (the project's reference data, plus ``extra_throughput.csv``:
published runs found since, in the same columns, sources in ``EXTRA_SOURCES.md``), translates what the simulator can express into a scenario
(``validation/scenarios/<row>.yaml``) and writes one table, ``validation/runs.csv``: the measured
figure and its kind, the source, the assumptions made where the source is silent, and, for the
runs the simulator cannot express yet, the reason. Translation rules (one per source) are below;
none of them looks at a measured figure.
"""
from __future__ import annotations

import argparse
import csv
import math
import re
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
DEFAULT_REFERENCE = HERE.parent.parent / "shared" / "reference" / "validation" / "throughput.csv"
DEFAULT_EXTRA = HERE / "extra_throughput.csv"

# Architecture traits by family (shapes come from each row).
GPT = dict(ffn_kind="gelu", norm="layernorm", position="learned", bias=True, dropout=True, tied_embeddings=True)
MPT = dict(ffn_kind="gelu", norm="layernorm", position="learned", bias=False, dropout=False, tied_embeddings=True)
LLAMA = dict(ffn_kind="swiglu", norm="rmsnorm", position="rope", bias=False, dropout=False, tied_embeddings=False)
NEMOTRON = dict(ffn_kind="gelu", norm="layernorm", position="rope", bias=False, dropout=False, tied_embeddings=False)
BLOOM = dict(ffn_kind="gelu", norm="layernorm", position="alibi", bias=True, dropout=False, tied_embeddings=True)

# NeMo 24.07 performance summary (S09): its table prints TP / PP / CP / VP only for pre-training; the
# NeMo-Framework-Launcher recipes of that release set the rest (TP-communication overlap; the
# interleaving of the fine-tuning runs, whose table rows give TP and PP only). Rows not listed keep
# the defaults: the GPT-3 20B and 175B recipes found do not match the table's layout (TP, VP).
NEMO_2407_RECIPES = {
    "LLAMA2-70B": ({"tp_comm_overlap": True}, "conf/training/llama/llama2_70b.yaml@4a9b61bc"),
    "Nemotron-8B": ({"tp_comm_overlap": True}, "conf/training/nemotron/nemotron_8b.yaml@089b90e6"),
    "Nemotron-22B": ({"tp_comm_overlap": True}, "conf/training/nemotron/nemotron_22b.yaml@3dd35614"),
    # its optim: mcore_distributed_optim with grad_sync_dtype: bf16 (NeMo: grad_reduce_in_fp32 False,
    # so Megatron-Core's main-grad buffer is bf16)
    "Nemotron-340B": ({"tp_comm_overlap": True, "grad_dtype": "bf16"},
                      "conf/training/nemotron/nemotron_340b.yaml@3be81fc1"),
    "LLAMA3-70B": ({"tp_comm_overlap": True}, "conf/training/llama/llama3_70b.yaml@3dd35614"),
    # the SFT scripts run launcher_scripts/conf/peft/llama/sft.yaml, whose optim is distributed_fused_adam
    # with dtype: bf16 and grad_sync_dtype: bf16 (@1ee3eb3e, and @3dd35614 as mcore_distributed_optim):
    # bf16 optimizer states without an fp32 master, bf16 gradients
    "LLAMA2-13B SFT": ({"virtual_stages": 10, "optimizer_dtype": "bf16", "grad_dtype": "bf16"},
                       "examples/peft/llama/h100/13b_1node.sh@7d6e2df9 + conf/peft/llama/sft.yaml@1ee3eb3e"),
    "LLAMA2-70B SFT": ({"virtual_stages": 20, "tp_comm_overlap": True, "optimizer_dtype": "bf16",
                        "grad_dtype": "bf16"},
                       "examples/peft/llama/h100/70b_2node.sh@1ee3eb3e + conf/peft/llama/sft.yaml@1ee3eb3e"),
    "LLAMA2-70B LoRA": ({"tp_comm_overlap": True}, "examples/peft/llama/h100/70b_1node_lora.sh@329df4af"),
}


def family(row: dict) -> dict:
    name = row["model"].lower()
    if "llama" in name:
        return LLAMA
    if "nemotron" in name:
        return NEMOTRON
    if "mpt" in name:
        return MPT
    if "bloom" in name:
        return BLOOM
    return GPT


def topology(row: dict) -> str | None:
    gpu = row["gpu"].lower()
    if "h100" in gpu:
        return "dgx-h100"
    if "v100" in gpu:
        return "dgx-2"
    if "a100" in gpu:
        if "40gb" in gpu or row["gpu_mem_gb"] == "40":
            return "dgx-a100-40gb"
        if "dgx-a100" in gpu and not row["gpu_mem_gb"]:
            return "dgx-a100-40gb"          # the 2020 DGX-A100 shipped with 40 GB parts
        return "dgx-a100"
    return None


GPU_OF_TOPOLOGY = {"dgx-2": "v100-32gb", "dgx-a100": "a100-80gb", "dgx-a100-40gb": "a100-40gb", "dgx-h100": "h100-sxm"}


def integer(text: str) -> int | None:
    m = re.match(r"\s*(\d+)", text or "")
    return int(m.group(1)) if m else None


def precision(row: dict, notes: list[str]) -> str:
    p = row["precision"].lower()
    if "fp8" in p:
        return "fp8"
    if "bf16" in p:
        return "bf16"
    if "fp16" in p:
        return "fp16"
    notes.append("precision not stated: bf16 assumed (same A100 tensor-core rate as fp16)")
    return "bf16"


def recompute(row: dict, notes: list[str]) -> str:
    r = row["act_recompute"].lower()
    src = row["source_id"]
    if r.startswith("full"):
        return "full"
    if r.startswith("selective"):
        return "selective"
    if r.startswith("none") or r in ("false", "no"):
        return "none"
    if r == "true":
        return "full"
    if src.startswith("S02"):
        notes.append("activation checkpointing not stated: full assumed (Megatron-LM 2020 example scripts)")
        return "full"
    if src.startswith(("S09", "S14")):
        notes.append("recompute not stated: none assumed (NeMo H100 recipes fit without it)")
        return "none"
    notes.append("recompute not stated: full assumed")
    return "full"


def zero_stage(row: dict, notes: list[str]) -> int:
    z = row["zero_fsdp"].lower()
    if "full_shard" in z or "zero-3" in z or "hsdp" in z:
        return 3
    if "shard_grad_op" in z or "zero-2" in z:
        return 2
    if "zero-1" in z:
        return 1
    if z.startswith("none"):
        return 0
    if row["source_id"].startswith("S09"):      # the long-sequence table leaves the column empty too
        notes.append("distributed optimizer not stated: NeMo's default (on) assumed -> ZeRO-1")
        return 1
    if z == "":
        return 0
    notes.append(f"sharding {row['zero_fsdp']!r} read as none")
    return 0


def translate(row: dict) -> tuple[dict | None, list[str], str]:
    """(scenario mapping or None, assumptions, reason when None)."""
    notes: list[str] = []
    src = row["source_id"]
    if src.startswith("S13"):
        return None, notes, "tensor-parallel degree, batch and step time not stated (headline 'up to' figure only)"
    if src.startswith("S15") and row["act_recompute"].startswith("selective op"):
        # torchtitan's per-op selective checkpointing saves the outputs of a list of ops (every other
        # matmul, attention) and recomputes the rest
        return None, notes, f"torchtitan's {row['act_recompute']!r} checkpointing is not modelled"
    topo = topology(row)
    if topo is None:
        return None, notes, f"no topology for GPU {row['gpu']!r}"
    tp, pp, dp, cp = (integer(row[k]) or 1 for k in ("tp", "pp", "dp", "cp"))
    gpus = integer(row["num_gpus"])
    if gpus is None or tp * pp * dp * cp != gpus:
        return None, notes, f"parallel layout does not multiply to the GPU count ({row['tp']}, {row['pp']}, {row['dp']}, {row['cp']})"
    seq = integer(row["seq_len"])
    gbs = integer(row["global_batch_seqs"])
    if seq is None or gbs is None:
        return None, notes, "sequence length or global batch not stated"
    mb = integer(row["micro_batch"])
    if mb is None and src.startswith(("S02", "S03")):
        mb = gbs // dp     # Megatron-LM before 2021 had no gradient accumulation: --batch-size per DP rank
        notes.append(f"micro-batch not stated: the whole per-rank batch {mb} assumed (Megatron-LM 2019-2020 "
                     f"had no gradient accumulation)")
    elif mb is None:
        mb = 1
        notes.append("micro-batch not stated: 1 assumed")
    if gbs % (dp * mb):
        return None, notes, f"global batch {gbs} not divisible by dp x micro-batch ({dp} x {mb})"
    vocab = integer(row["vocab"]) or 51200
    model = dict(name=row["model"], layers=int(row["layers"]), hidden=int(row["hidden"]), heads=int(row["heads"]),
                 kv_heads=integer(row["kv_heads"]) or int(row["heads"]), ffn_hidden=int(row["ffn_hidden"]),
                 vocab=vocab, max_seq_len=max(seq, 2048), **family(row))
    per_node = {"dgx-2": 16}.get(topo, 8)
    cluster = {"topology": topo, "nodes": math.ceil(gpus / per_node)}
    if gpus % per_node:
        cluster["gpus"] = gpus
    par = {"tp": tp, "pp": pp, "dp": dp, "cp": cp, "zero": zero_stage(row, notes)}
    if "hsdp" in row["zero_fsdp"].lower():      # FSDP HYBRID_SHARD: shards within a node, replicas across
        par["dp_shard"] = per_node // (tp * cp)
    if src.startswith("S01") and par["zero"] == 3:
        # the paper's ZeRO-3 runs (arXiv:2104.04473, April 2021) predate DeepSpeed 0.4.1's gather rewrite
        par["zero3_impl"] = "deepspeed-0.3"
        notes.append("DeepSpeed version not stated: ZeRO-3 as of v0.3 (spring 2021, the paper's date) assumed")
    sp = row["seq_parallel"].lower()
    modern = src.startswith(("S06", "S09", "S14"))
    par["sequence_parallel"] = sp.startswith("yes") or (tp > 1 and sp in ("", "not stated") and modern)
    if modern and tp > 1 and sp in ("", "not stated"):
        notes.append("sequence parallelism not stated: on assumed (Megatron-Core / NeMo practice with TP)")
    par["recompute"] = recompute(row, notes)
    recipe, recipe_file = NEMO_2407_RECIPES.get(row["model"], ({}, "")) if src.startswith("S09_nemo_24") \
        else ({}, "")
    # the recipe's ub_tp_comm_overlap: cited in the row's notes (S14) or from the recipe file (S09)
    cited = "tp comm overlap on" in row["notes"].lower()
    if (cited or recipe.get("tp_comm_overlap")) and tp > 1 and par["sequence_parallel"]:
        par["tp_comm_overlap"] = True
        if not cited:
            notes.append(f"TP-comm overlap not stated: on, as the NeMo-Framework-Launcher recipe sets it "
                         f"({recipe_file})")
    v = integer(row["vpp"])
    if recipe.get("virtual_stages") and not v:
        v = recipe["virtual_stages"]
        notes.append(f"interleaving not stated: V = {v}, as the NeMo-Framework-Launcher script sets it ({recipe_file})")
    pinned = None
    if row["vpp"].startswith("interleaved") and src.startswith("S06") and pp > 1:
        # Llama 3 §3.3.2: one layer taken from the first and the last stage leaves "the first model chunk
        # on the first stage [with] only the embedding, and the last model chunk on the last stage [with]
        # only output projection and loss calculation", so a chunk holds one layer: V = (layers + 2) / pp
        v, pinned = (int(row["layers"]) + 2) // pp, 0
        notes.append(f"interleaved schedule, V not stated: one-layer chunks with an embedding-only first and an "
                     f"output-only last chunk (Sec. 3.3.2) give V = {v}")
    elif row["vpp"].startswith("interleaved"):
        v = 2
        notes.append("interleaved schedule, V not stated: 2 assumed")
    m = gbs // (dp * mb)
    if v and v > 1 and pp > 1:
        empty = 2 if pinned == 0 else 0          # chunks that hold no layer
        if m % pp or row["layers"] and int(row["layers"]) < pp * v - empty:
            notes.append(f"interleaving V={v} impossible with {m} microbatches on {pp} stages: plain 1F1B used")
        else:
            par["schedule"], par["virtual_stages"] = "interleaved", v
    if pinned is not None and par.get("schedule") == "interleaved":
        par["first_stage_layers"] = par["last_stage_layers"] = pinned
    training = {"seq_len": seq, "global_batch_size": gbs, "micro_batch_size": mb, "precision": precision(row, notes)}
    # settings a row's notes cite from the run's own configuration (S14: the recipe's yaml and configure.sh)
    if "grad_sync_dtype: bf16" in row["notes"]:
        training["grad_dtype"] = "bf16"
    elif recipe.get("grad_dtype"):
        training["grad_dtype"] = recipe["grad_dtype"]
        notes.append(f"gradient dtype not stated: {recipe['grad_dtype']} (grad_sync_dtype), as the "
                     f"NeMo-Framework-Launcher recipe sets it ({recipe_file})")
    if recipe.get("optimizer_dtype"):
        training["optimizer_dtype"] = recipe["optimizer_dtype"]
        notes.append(f"optimizer states not stated: {recipe['optimizer_dtype']} without an fp32 master "
                     f"(optim.dtype), as the recipe sets it ({recipe_file}); its fp8_params (fp8 weights plus a "
                     f"bf16 copy in the optimizer) are modelled as bf16 weights")
    if "NVTE_FUSED_ATTN=0" in row["notes"]:      # Transformer Engine's flash-attn (FA2, mma.sync) backend
        training["attention_kernel_arch"] = "ampere"
    lora = "lora" in row["model"].lower()
    if lora:
        # NeMo 24.07 megatron_gpt_finetuning_config.yaml, peft.lora_tuning: adapter_dim 32, alpha 32,
        # target_modules [attention_qkv] (one adapter on the fused QKV projection); modelled as rank-32
        # adapters on q, k and v (2 x r x hidden more adapter parameters per layer), bf16 adapters
        notes.append("LoRA settings not stated: NeMo defaults assumed (rank 32 on the QKV projection, "
                     "modelled as rank-32 adapters on q, k and v)")
    if src.startswith(("S01", "S02", "S03", "S04", "S12")):
        training["flash_attention"] = False      # these Megatron-LM / DeepSpeed runs predate FlashAttention
    if src.startswith(("S01", "S02", "S03", "S12")) and tp > 1:
        # Megatron-LM launched the backward's TP all-reduce asynchronously from late 2021 (async
        # tensor-model-parallel allreduce; ported to apex in apex PR #1181, 2021-10); these runs are
        # older, and BLOOM's bigscience Megatron-DeepSpeed fork has a synchronous all-reduce
        par["tp_backward_overlap"] = False
        notes.append("Megatron-LM of 2019-2021 (BLOOM: bigscience fork): the backward's TP all-reduces in line, "
                     "not beside the gradient GEMMs")
    if src.startswith("S07"):
        # the MPT yamls' optimizer decoupled_adamw is Composer's DecoupledAdamW: a Python loop over the
        # parameters of separate torch ops (composer/optim/decoupled_weight_decay.py), one DRAM pass each
        training["optimizer_impl"] = "unfused"
        notes.append("optimizer: Composer's DecoupledAdamW (decoupled_adamw in the MPT yamls), unfused: one pass "
                     "over the states per elementwise op")
    if src.startswith("S07") and (topo == "dgx-h100" or row["precision"] == "amp_bf16"):
        # llm-foundry scripts/train/benchmarking/h100new.md @beb8dee6 lists these rows (the README's H100 BF16
        # table and the A100 80GB amp_bf16 rows) with the image mosaicml/pytorch:2.1.0_cu121-nightly20230827:
        # CUDA 12.1's cuBLAS has Hopper GEMM kernels; the attention (llm-foundry's Triton flash attention,
        # or flash-attn v1) is built on mma.sync; PyTorch >= 2.1's non-reentrant checkpoint stops early
        # (the launcher submit_benchmarks.py @12a63191 sets fsdp_config.activation_checkpointing_reentrant False)
        if topo == "dgx-h100":
            training["attention_kernel_arch"] = "ampere"
            notes.append("software stack: PyTorch 2.1 + CUDA 12.1 (the image in h100new.md): Hopper cuBLAS GEMMs, "
                         "attention kernels on mma.sync (Triton / flash-attn v1; attn_impl not stated)")
        if par.get("recompute") == "full":
            par["recompute_early_stop"] = True
            notes.append("activation checkpointing: PyTorch 2.1 non-reentrant checkpoint (the launcher sets "
                         "activation_checkpointing_reentrant: False), whose early stop skips each block's "
                         "down projection in the recomputation")
    memory = {}
    if src.startswith(("S15", "S18")):
        # PyTorch-native stacks: torchtitan (docs/performance.md era, mid 2024) and IBM's fms-fsdp
        # (use_torch_compile=False in its scripts): eager modules, FSDP per block,
        # torch.optim.AdamW(foreach=True) -- one pass per op -- and checkpoint_wrapper's non-reentrant
        # checkpoint, whose early stop skips the last GEMM. torchtitan's model returns fp32 logits and
        # F.cross_entropy saves fp32 log-probabilities, whose backward holds their gradient and the
        # logits' gradient: 3 fp32 logits-sized tensors; fms-fsdp's bf16 logits (MixedPrecision param
        # bf16) keep 3 bf16 ones, 1.5 fp32-sized
        training["implementation"] = "torch"
        training["optimizer_impl"] = "unfused"
        torchtitan = src.startswith("S15")
        memory["logits_copies"] = 3 if torchtitan else 1.5
        notes.append(f"{'torchtitan' if torchtitan else 'fms-fsdp'}: eager modules (torch.compile off), AdamW "
                     f"foreach (unfused), loss on {'fp32' if torchtitan else 'bf16'} logits")
        if not torchtitan:
            # fms_fsdp/policies/mixed_precision.py bfSixteen: param_dtype and reduce_dtype bf16
            training["grad_dtype"] = "bf16"
            notes.append("fms-fsdp: gradients reduced in bf16 (its bfSixteen mixed-precision policy); interconnect "
                         "not stated: DGX A100 nodes (8 x 200 Gb/s) assumed")
        if row["act_recompute"].startswith("selective layer"):
            # torchtitan's "selective layer" checkpointing wraps every 2nd block (selective_ac_option "2")
            par["recompute"], par["recompute_layers"] = "full", int(row["layers"]) // 2
            notes.append("torchtitan 'selective layer' checkpointing: every 2nd block checkpointed in full "
                         "(selective_ac_option '2'), modelled as recompute_layers = layers / 2")
        if par["recompute"] == "full":
            par["recompute_early_stop"] = True
    scenario = {"name": f"{row['row_id']} {row['model']}", "model": model, "cluster": cluster, "training": training,
                "parallelism": par}
    if memory:
        scenario["memory"] = memory
    if lora:
        scenario["finetune"] = {"method": "lora", "rank": 32, "alpha": 32, "target_modules": ["q", "k", "v"],
                                "adapter_dtype": "bf16"}
    return scenario, notes, ""


def measured(row: dict) -> tuple[str, str, str]:
    """(metric, value, kind): step time when the source gives or implies it, else TFLOP/s per GPU."""
    if row["step_time_s"]:
        return "step_time_s", row["step_time_s"], ""
    kind = row["tflops_kind"].lower()
    convention = "hardware" if ("hardware" in kind or "recompute" in kind) else "model"
    return "tflops_per_gpu", row["tflops_per_gpu"], convention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE)
    parser.add_argument("--extra", type=Path, default=DEFAULT_EXTRA)
    args = parser.parse_args()
    rows = list(csv.DictReader(args.reference.open()))
    if args.extra.is_file():
        rows += list(csv.DictReader(args.extra.open()))
    if len({r["row_id"] for r in rows}) != len(rows):
        raise SystemExit("duplicate row_id between the reference and the extra rows")
    out_dir = HERE / "scenarios"
    for old in out_dir.glob("*.yaml"):
        old.unlink()
    table = []
    for row in rows:
        scenario, notes, reason = translate(row)
        metric, value, convention = measured(row)
        gpu = GPU_OF_TOPOLOGY.get(topology(row), row["gpu"])
        record = {"row_id": row["row_id"], "source_id": row["source_id"], "model": row["model"],
                  "gpu": gpu, "gpus": row["num_gpus"], "metric": metric, "measured": value,
                  "flop_convention": convention, "scenario": "", "assumptions": "; ".join(notes),
                  "not_expressible": reason, "source_ref": row["source_ref"]}
        if scenario is not None and value:
            path = out_dir / f"{row['row_id']}.yaml"
            header = (f"# Validation run {row['row_id']}: {row['model']} on {row['num_gpus']} x {row['gpu']}\n"
                      f"# Source: {row['source_ref']}\n# Measured: {metric} = {value}"
                      + (f" ({convention} FLOPs)" if convention else "") + "\n"
                      + "".join(f"# Assumed: {n}\n" for n in notes))
            path.write_text(header + yaml.safe_dump(scenario, sort_keys=False))
            record["scenario"] = f"scenarios/{path.name}"
        elif scenario is not None:
            record["not_expressible"] = "no measured figure"
        table.append(record)
    with (HERE / "runs.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    usable = sum(1 for r in table if r["scenario"])
    print(f"{len(table)} published runs, {usable} expressible -> validation/runs.csv, validation/scenarios/")


if __name__ == "__main__":
    main()

"""The SimPy replay: pipeline bubbles, overlap, memory timeline and determinism."""

import pytest

from sim.analysis import analyze
from sim.engine import simulate
from sim.memory import memory_report
from sim.report import to_json
from sim.scenario import load_scenario, scenario_from_mapping

from conftest import SCENARIOS

TINY = {"layers": 32, "hidden": 8192, "heads": 64, "ffn_hidden": 32768, "vocab": 128, "max_seq_len": 2048,
        "ffn_kind": "gelu", "position": "rope"}


def pipeline(pp, m, schedule="gpipe", v=1, nodes=1):
    gpus = 8 * nodes
    dp = gpus // pp
    data = {"model": TINY, "cluster": {"topology": "dgx-h100", "nodes": nodes},
            "training": {"seq_len": 2048, "global_batch_size": m * dp, "micro_batch_size": 1},
            "parallelism": {"tp": 1, "pp": pp, "dp": dp, "schedule": schedule, "virtual_stages": v}}
    return scenario_from_mapping(data)


def stage0(result):
    return result.devices[0].breakdown_s


@pytest.mark.parametrize("p, m", [(4, 8), (8, 32)])
def test_gpipe_bubble_fraction(p, m):
    r = simulate(pipeline(p, m, "gpipe"), free_communication=True)
    b = stage0(r)
    assert b["exposed_comm"] == pytest.approx(0, abs=1e-12)
    fraction = b["bubble"] / (b["bubble"] + b["compute"])
    assert fraction == pytest.approx((p - 1) / (m + p - 1), rel=0.01)


def test_1f1b_same_step_as_gpipe_but_holds_p_microbatches():
    p, m = 4, 8
    g = simulate(pipeline(p, m, "gpipe"), free_communication=True)
    f = simulate(pipeline(p, m, "1f1b"), free_communication=True)
    assert f.step_time_s == pytest.approx(g.step_time_s, rel=1e-6)
    act_g = g.devices[0].peak_breakdown["activations"]
    act_f = f.devices[0].peak_breakdown["activations"]
    assert act_f / act_g == pytest.approx(p / m, rel=0.01)


def test_interleaving_cuts_the_bubble_by_v():
    p, m, v = 4, 8, 2
    plain = stage0(simulate(pipeline(p, m, "1f1b"), free_communication=True))["bubble"]
    inter = stage0(simulate(pipeline(p, m, "interleaved", v), free_communication=True))["bubble"]
    assert plain / inter == pytest.approx(v, rel=0.02)


def test_breakdown_adds_up_and_engine_memory_agrees_with_analytic():
    s = load_scenario(SCENARIOS / "gpt3-175b-a100.yaml", ["training.global_batch_size=96"])
    r = simulate(s)
    analytic = memory_report(s.model, s.plan, s.cluster.gpu, s.memory)
    for dev in r.devices:
        assert sum(dev.breakdown_s.values()) == pytest.approx(r.step_time_s, rel=1e-9)
        assert dev.peak_bytes == pytest.approx(analytic[dev.stage].total, rel=0.01)


def test_dp_reduction_hidden_except_last_bucket():
    data = {"model": "llama3-8b", "cluster": {"topology": "dgx-h100", "nodes": 2},
            "training": {"seq_len": 4096, "global_batch_size": 16, "micro_batch_size": 4, "grad_dtype": "bf16"},
            "parallelism": {"tp": 8, "pp": 1, "dp": 2, "zero": 0}}
    r = simulate(scenario_from_mapping(data))
    dev = r.devices[0]
    dp_spans = [s for s in dev.spans if s.stream == "dp"]
    assert len(dp_spans) > 3
    backward_end = max(s.end_s for s in dev.spans if s.phase == "backward")
    backward_start = min(s.start_s for s in dev.spans if s.phase == "backward")
    total_dp = sum(s.end_s - s.start_s for s in dp_spans)
    assert total_dp < backward_end - backward_start          # the premise: reduction shorter than backward
    optimizer = next(s for s in dev.spans if s.phase == "optimizer")
    exposed = optimizer.start_s - backward_end
    last = dp_spans[-1].end_s - dp_spans[-1].start_s
    # all but the tail is hidden: what the optimizer waits for is about one bucket, not the whole reduction
    assert 0 < exposed <= 2 * last
    assert exposed < 0.2 * total_dp


def test_same_scenario_same_output():
    s = load_scenario(SCENARIOS / "gpt3-175b-a100.yaml", ["training.global_batch_size=96"])
    assert to_json(analyze(s)) == to_json(analyze(s))


def test_full_mode_agrees_with_symmetric_mode():
    data = {"model": "llama3-8b", "cluster": {"topology": "dgx-h100", "nodes": 2},
            "training": {"seq_len": 4096, "global_batch_size": 16, "micro_batch_size": 1},
            "parallelism": {"tp": 4, "pp": 2, "dp": 2, "zero": 1, "sequence_parallel": True}}
    s = scenario_from_mapping(data)
    sym, full = simulate(s), simulate(s, full=True)
    assert len(full.devices) == 16 and len(sym.devices) == 2
    assert full.step_time_s == pytest.approx(sym.step_time_s, rel=0.01)


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_zero3_gathers_each_layer_and_memory_agrees(recompute):
    data = {"model": "llama3-8b", "cluster": {"topology": "dgx-h100", "nodes": 2},
            "training": {"seq_len": 4096, "global_batch_size": 32, "micro_batch_size": 1},
            "parallelism": {"tp": 1, "pp": 2, "dp": 8, "zero": 3, "recompute": recompute}}
    s = scenario_from_mapping(data)
    r = simulate(s)
    dev = r.devices[0]
    gathers = [x for x in dev.spans if x.name.endswith(".gather")]
    reduces = [x for x in dev.spans if x.name.endswith(".grads")]
    # each of the stage's 16 layers gathered for its forward and again for its backward, per microbatch
    assert len(gathers) == 2 * 16 * s.plan.microbatches and len(reduces) == 16 * s.plan.microbatches
    # (on the first stage the two gathered layers coincide with the activation peak, as the analytic
    # model assumes; on the last stage the logits peak comes first and the analytic sum is conservative)
    analytic = memory_report(s.model, s.plan, s.cluster.gpu, s.memory)[0]
    assert dev.peak_bytes == pytest.approx(analytic.total, rel=0.01)
    assert sum(dev.breakdown_s.values()) == pytest.approx(r.step_time_s, rel=1e-9)


def test_every_parameter_gradient_is_reduced():
    # DP all-reduce (ZeRO-0) of each stage = all of the stage's parameters in the gradient dtype
    s = load_scenario(SCENARIOS / "gpt3-175b-a100.yaml", ["training.global_batch_size=96"])
    from sim.workload import lower
    for prog in lower(s.model, s.plan, s.memory, s.cluster.gpu):
        sent = sum(op.collective.size_bytes for op in prog.ops if op.name.startswith("dp.grads"))
        expected = memory_report(s.model, s.plan, s.cluster.gpu, s.memory)[prog.stage].params * 2   # fp16 grads
        assert sent == pytest.approx(expected, rel=1e-9)


def test_uneven_layout_simulates_every_device():
    # 24 GPUs over 3 nodes of 8 with pipeline stages of 12 GPUs: stages straddle nodes unevenly
    data = {"model": {"base": "llama3-8b", "layers": 2}, "cluster": {"topology": "dgx-h100", "nodes": 3},
            "training": {"seq_len": 1024, "global_batch_size": 6},
            "parallelism": {"tp": 4, "pp": 2, "dp": 3, "schedule": "gpipe", "zero": 1}}
    s = scenario_from_mapping(data)
    auto, full = simulate(s), simulate(s, full=True)
    assert auto.full and len(auto.devices) == 24
    assert auto.step_time_s == pytest.approx(full.step_time_s, rel=1e-12)


@pytest.mark.parametrize("sets", [
    ["parallelism.pp=4", "parallelism.dp=2", "parallelism.recompute=full"],                         # 1F1B, 128 mb
    ["parallelism.pp=4", "parallelism.dp=2", "parallelism.schedule=interleaved", "parallelism.virtual_stages=2"],
    ["parallelism.pp=1", "parallelism.dp=8", "parallelism.zero=3"],                                  # ZeRO-3 gathers
])
def test_extrapolated_step_equals_the_full_replay(sets):
    """Sweeps replay two short microbatch counts and extrapolate: in the steady state every microbatch adds
    the same work, so the step and its breakdown must equal those of the replay of every microbatch."""
    from sim.engine import extrapolation_points
    sc = load_scenario(SCENARIOS / "llama3-70b-64xh100.yaml",
                       ["model=llama3-8b", "cluster.nodes=1", "training.global_batch_size=256", "parallelism.tp=1",
                        "parallelism.sequence_parallel=false", *sets])
    assert extrapolation_points(sc.plan) is not None             # the plan is long enough to extrapolate
    full, ext = simulate(sc), simulate(sc, extrapolate=True)
    assert ext.extrapolated_from is not None and full.extrapolated_from is None
    assert ext.step_time_s == pytest.approx(full.step_time_s, rel=1e-6)
    for key, value in full.devices[0].breakdown_s.items():
        assert ext.devices[0].breakdown_s[key] == pytest.approx(value, rel=1e-6, abs=1e-9 * full.step_time_s)
    assert ext.devices[0].memory_bound_s == pytest.approx(full.devices[0].memory_bound_s, rel=1e-6)
    # the busiest links: the same busy fractions (links that tie may trade places)
    assert [f for _, f in ext.link_busy] == pytest.approx([f for _, f in full.link_busy], rel=1e-6)
    full_busy = dict(full.link_busy)
    assert all(f == pytest.approx(full_busy[name], rel=1e-6) for name, f in ext.link_busy if name in full_busy)


@pytest.mark.parametrize("cp", [1, 2])
def test_layerless_first_and_last_chunks_still_wait_for_their_neighbours(cp):
    # Llama 3's pipeline (arXiv:2407.21783 §3.3.2): the first chunk holds only the embedding and the
    # last only the output layer and loss; their ops must still wait for the activation / gradient
    # of the neighbouring chunk (with CP the layers run one op each, a different code path)
    pp, v, m = 4, 2, 4
    data = {"model": {**TINY, "layers": pp * v - 2}, "cluster": {"topology": "dgx-h100", "nodes": 1},
            "training": {"seq_len": 2048, "global_batch_size": m * 2 // cp, "micro_batch_size": 1},
            "parallelism": {"tp": 1, "pp": pp, "cp": cp, "dp": 2 // cp, "schedule": "interleaved",
                            "virtual_stages": v, "first_stage_layers": 0, "last_stage_layers": 0}}
    s = scenario_from_mapping(data)
    assert s.plan.chunk_layers == (0,) + (1,) * 6 + (0,)
    r = simulate(s, full=True)
    spans = {}
    for d in r.devices:
        for x in d.spans:
            spans.setdefault(x.name, x)
    last = pp * v - 1
    for mb in range(m):
        before = [x for n, x in spans.items() if n.startswith(f"F.mb{mb}.c{last - 1}") and x.stream == "compute"]
        logits = spans[f"F.mb{mb}.c{last}.logits"]
        assert before and logits.start_s >= max(x.end_s for x in before)
        after = [x for n, x in spans.items() if n.startswith(f"B.mb{mb}.c1") and x.stream == "compute"]
        embed = spans[f"B.mb{mb}.c0.embed"]
        assert after and embed.start_s >= max(x.end_s for x in after)


def test_deepspeed_03_zero3_runs_at_the_framework_rate():
    # DeepSpeed 0.3's ZeRO-3 (efficiency.yaml `frameworks`): every layer's weights are gathered for the
    # forward, again for the recomputation and again for the backward, and its gradients are
    # reduce-scattered in line, each at 21.7 GB/s per GPU (DeepSpeed PR #1188 / issue #1174 figures).
    # With little compute the step is bounded below by those 4 passes, by hand:
    h, ffn, layers = 8192, 32768, 4
    layer_bytes = (4 * h * h + 2 * h * ffn + 4 * h) * 2          # MHA + GELU MLP + 2 LayerNorms, fp16
    rate = 21.7e9
    bound = 4 * layers * layer_bytes / rate
    data = {"model": {**TINY, "layers": layers, "norm": "layernorm"}, "cluster": {"topology": "dgx-a100", "nodes": 2},
            "training": {"seq_len": 256, "global_batch_size": 16, "micro_batch_size": 1, "precision": "fp16"},
            "parallelism": {"tp": 1, "pp": 1, "dp": 16, "zero": 3, "recompute": "full",
                            "zero3_impl": "deepspeed-0.3"}}
    ds = simulate(scenario_from_mapping(data))
    compute = ds.devices[0].breakdown_s["compute"]
    assert bound * (1 - 1e-6) <= ds.step_time_s <= bound + compute + 0.05 * bound
    gathers = [x for x in ds.devices[0].spans if x.name.endswith(".gather")]
    assert len(gathers) == 3 * layers
    assert min(x.end_s - x.start_s for x in gathers) >= layer_bytes / rate * (1 - 1e-9)
    data["parallelism"]["zero3_impl"] = "fsdp"     # network-rate gathers, overlapped, reused for the recompute
    assert simulate(scenario_from_mapping(data)).step_time_s < 0.5 * ds.step_time_s


def test_deepspeed_03_reduce_scatter_waits_for_the_layers_tp_collective():
    # in line means after the layer's whole backward, its TP collective included: the next layer's
    # work must depend (transitively) on that collective
    data = {"model": {**TINY, "layers": 2}, "cluster": {"topology": "dgx-a100", "nodes": 2},
            "training": {"seq_len": 256, "global_batch_size": 8, "micro_batch_size": 1, "precision": "fp16"},
            "parallelism": {"tp": 2, "pp": 1, "dp": 8, "zero": 3, "recompute": "full", "zero3_impl": "deepspeed-0.3"}}
    s = scenario_from_mapping(data)
    from sim.workload import lower
    prog = lower(s.model, s.plan, s.memory, s.cluster.gpu)[0]
    ops = prog.ops

    def ancestors(i, seen=None):
        seen = set() if seen is None else seen
        for d in ops[i].deps:
            if d is not None and d not in seen:
                seen.add(d)
                ancestors(d, seen)
        return seen

    tp_bwd = [op.index for op in ops if op.name.startswith("B.") and op.stream == "tp"]
    later = [op.index for op in ops if op.name.startswith("R.") and op.stream == "compute"]
    assert tp_bwd and later
    first_tp = min(tp_bwd)
    assert any(first_tp in ancestors(i) for i in later if i > first_tp)
    assert all(first_tp in ancestors(i) for i in later if i > first_tp)


def _tp_overlap_case(overlap: bool, tp: int = 8, nodes: int = 1):
    model = {"layers": 8, "hidden": 4096 if tp > 8 else 8192, "heads": 64, "kv_heads": 8,
             "ffn_hidden": 14336 if tp > 8 else 28672, "vocab": 128256, "max_seq_len": 8192,
             "ffn_kind": "swiglu", "position": "rope"}
    data = {"model": model, "cluster": {"topology": "dgx-h100", "nodes": nodes},
            "training": {"seq_len": 8192, "global_batch_size": 8, "micro_batch_size": 4},
            "parallelism": {"tp": tp, "pp": 1, "dp": 1, "sequence_parallel": True, "tp_comm_overlap": overlap,
                            "tp_backward_overlap": overlap, "tp_across_nodes": tp > 8}}
    return scenario_from_mapping(data)


def test_tp_comm_overlap_leaves_the_last_pipelined_reduce_scatter_split_exposed():
    # Without overlap the TP collectives are exposed: X = step - compute-only step. With it, only the
    # last of num_splits = 4 chunks of the forward's 2 reduce-scatters per layer waits for its GEMM:
    # a quarter of the forward's reduce-scatter bytes, i.e. 1/4 x 1/2 (RS of AG + RS) x 1/2 (forward of
    # forward + backward, no recompute) = X / 16, plus the latency of the extra split. The rest,
    # 15 X / 16, runs beside the GEMMs, which lose the SMs of the userbuffers kernels meanwhile: NeMo's
    # H100 configs give them 24, 8, 2, 24, 2, 2 and 4 x 0 of the 132 SMs
    share = (24 + 8 + 2 + 24 + 2 + 2) / 10 / 132
    slowdown = 1 / (1 - share) - 1
    on, off = _tp_overlap_case(True), _tp_overlap_case(False)
    compute = simulate(on, free_communication=True).step_time_s
    exposed = simulate(off).step_time_s - compute
    extra = simulate(on).step_time_s - compute
    expected = exposed / 16 + slowdown / (1 + slowdown) * 15 * exposed / 16
    assert 0.95 * expected <= extra <= 1.15 * expected


def test_tp_comm_overlap_cannot_hide_more_than_the_compute():
    # 16-way TP across two nodes: the collectives take as long as the compute. Overlapped, the step
    # is at least the longer of the two and at most their sum
    on, off = _tp_overlap_case(True, tp=16, nodes=2), _tp_overlap_case(False, tp=16, nodes=2)
    compute = simulate(on, free_communication=True).step_time_s
    comm = simulate(off).step_time_s - compute
    assert comm > 0.5 * compute
    step = simulate(on).step_time_s
    assert max(compute, comm * (1 - 1 / 16)) <= step < compute + comm


def test_kernels_beside_a_collective_run_slower_by_the_sourced_fraction():
    # a forward pass of C seconds and, beside it from the start, an all-reduce of X < C seconds on the
    # data-parallel group: while the all-reduce is in flight the kernels run at 1 / (1 + s) of their
    # rate (s = 0.189, arXiv:2507.03114's average slowdown beside NCCL collectives), so they finish at
    # X + (C - X / (1 + s)) = C + X s / (1 + s)
    from sim.engine import Engine
    from sim.workload import Collective, Program
    s = 0.189
    data = {"model": {**TINY, "layers": 4}, "cluster": {"topology": "dgx-h100", "nodes": 2},
            "training": {"seq_len": 2048, "global_batch_size": 16, "micro_batch_size": 1},
            "parallelism": {"tp": 1, "pp": 1, "dp": 16}}
    eng = Engine(scenario_from_mapping(data))
    forward = max((op for op in eng.programs[0].ops if op.phase == "forward" and op.kernels), key=eng.duration)

    def replay(with_compute: bool, with_comm: bool, size: float = 2e9) -> float:
        prog = Program(0)
        if with_compute:
            prog.add("compute", "F", "forward", kernels=forward.kernels)
        if with_comm:
            prog.add("dp", "AR", "comm", collective=Collective("all_reduce", "dp", size))
        eng.programs = [prog]
        return eng.run().step_time_s

    compute, comm = replay(True, False), replay(False, True)
    assert 0.2 * compute < comm < compute
    assert replay(True, True) == pytest.approx(compute + comm * s / (1 + s), rel=1e-9)
    # a collective longer than the kernels: they run slowed the whole time, C (1 + s), under it
    long_comm = replay(False, True, size=40e9)
    assert long_comm > compute * (1 + s)
    result = replay(True, True, size=40e9)
    assert result == pytest.approx(long_comm, rel=1e-9)
    spans = {x.name: x for x in eng.run().devices[0].spans}
    assert spans["F"].end_s - spans["F"].start_s == pytest.approx(compute * (1 + s), rel=1e-9)


def _tp_backward_case(sequence_parallel: bool, overlap: bool, recompute: str = "none", early_stop: bool = False):
    model = {"layers": 8, "hidden": 8192, "heads": 64, "kv_heads": 8, "ffn_hidden": 28672, "vocab": 128256,
             "max_seq_len": 8192, "ffn_kind": "swiglu", "position": "rope"}
    data = {"model": model, "cluster": {"topology": "dgx-h100", "nodes": 1},
            "training": {"seq_len": 8192, "global_batch_size": 8, "micro_batch_size": 4},
            "parallelism": {"tp": 8, "pp": 1, "dp": 1, "sequence_parallel": sequence_parallel,
                            "tp_backward_overlap": overlap, "recompute": recompute,
                            "recompute_early_stop": early_stop}}
    return scenario_from_mapping(data)


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_backward_tp_collectives_of_column_parallel_layers_run_beside_the_gradient_gemms(sequence_parallel):
    # Without the overlap every TP collective is exposed: X = step - compute-only step, half of it in
    # the forward, half in the backward (the same collectives). Megatron-LM / TE launch the backward's
    # column-parallel collectives asynchronously: without SP both gradient all-reduces run beside the
    # gradient GEMMs; with SP the input re-gathers and gradient reduce-scatters (as many bytes as the
    # backward's X / 2) run beside them and the row-parallel layers' 2 gradient all-gathers (X / 4) stay
    # in line. Kernels beside an NCCL collective run at 1 / (1 + s), s = 0.189 (arXiv:2507.03114), so
    # the hidden X / 2 still costs s / (1 + s) x X / 2
    s = 0.189
    on, off = _tp_backward_case(sequence_parallel, True), _tp_backward_case(sequence_parallel, False)
    compute = simulate(on, free_communication=True).step_time_s
    exposed = simulate(off).step_time_s - compute
    extra = simulate(on).step_time_s - compute
    inline = exposed / 2 + (exposed / 4 if sequence_parallel else 0.0)
    expected = inline + s / (1 + s) * exposed / 2
    assert extra == pytest.approx(expected, rel=0.05)
    # the breakdown reports the slowed part apart: the sum of what each compute op lost
    run = simulate(on).devices[0]
    assert run.breakdown_s["overlap_slowdown"] == pytest.approx(sum(run.slowed_s.values()), rel=1e-9)
    assert run.breakdown_s["overlap_slowdown"] == pytest.approx(s / (1 + s) * exposed / 2, rel=0.05)


def test_early_stopped_recomputation_skips_the_down_projection_and_its_all_reduce():
    # PyTorch >= 2.1 non-reentrant checkpoint: the recomputation stops at the down projection's input,
    # so the recompute op holds the forward's kernels up to (not including) mlp_down, and of the
    # forward's 2 TP all-reduces per layer only the one after the attention block is re-run
    from sim.engine import Engine
    full = Engine(_tp_backward_case(False, False, "full")).programs[0]
    early = Engine(_tp_backward_case(False, False, "full", early_stop=True)).programs[0]

    def recompute_names(prog):
        return [k.name for op in prog.ops if op.phase == "recompute" for k in op.kernels]

    def recompute_all_reduces(prog):
        after = {op.index for op in prog.ops if op.phase == "recompute"}
        return sum(op.collective.count for op in prog.ops
                   if op.collective is not None and op.collective.kind == "all_reduce" and set(op.deps) & after)

    names, early_names = recompute_names(full), recompute_names(early)
    assert "mlp_down" in names and "residual2" in names
    assert "mlp_down" not in early_names and "residual2" not in early_names
    assert len(early_names) == len(names) - 2 * 8 * 2      # 2 microbatches x 8 layers x 2 kernels
    assert recompute_all_reduces(full) == 2 * 8 * 2        # 2 microbatches x 8 layers x 2
    assert recompute_all_reduces(early) == 1 * 8 * 2


def test_early_stop_with_a_lora_adapter_on_the_down_projection_skips_only_its_b():
    # PEFT runs the frozen base GEMM and the adapter's A before B, so B's input is the last tensor saved:
    # the recomputation re-runs the base down projection and A, and skips B, the add and the residual;
    # hardware FLOPs drop by B's 2 r h per token and layer (h = the down projection's outputs)
    from sim.flops import step_flops
    from sim.kernels import LayerKernels
    data = {"model": "llama2-7b", "cluster": {"topology": "dgx-a100", "nodes": 1, "gpus": 1},
            "training": {"seq_len": 1024, "global_batch_size": 1, "micro_batch_size": 1},
            "parallelism": {"recompute": "full", "recompute_early_stop": True},
            "finetune": {"method": "lora", "rank": 16, "target_modules": ["q", "k", "v", "o", "gate", "up", "down"]}}
    sc = scenario_from_mapping(data)
    names = [k.name for k in LayerKernels(sc.model, sc.plan).recompute_forward]
    assert names[-2:] == ["mlp_down", "lora_down.A"] and "lora_down.B" not in names and "residual2" not in names
    m, plan = sc.model, sc.plan
    full = step_flops(m, tokens=1024, seq_len=1024, recompute="full", finetune=plan.finetune)
    early = step_flops(m, tokens=1024, seq_len=1024, recompute="full", finetune=plan.finetune, early_stop=True)
    assert full.hardware_flop - early.hardware_flop == pytest.approx(m.layers * 1024 * 2 * 16 * m.hidden, rel=1e-12)


def test_partial_recompute_between_none_and_full():
    # recompute_layers = 16 of 32: the recompute ops of 16 layers per microbatch; the activations of
    # 16 layers kept whole and 16 as inputs (the replay's peak within 10% below the analytic one)
    data = {"model": "llama3-8b", "cluster": {"topology": "dgx-h100", "nodes": 1},
            "training": {"seq_len": 4096, "global_batch_size": 16, "micro_batch_size": 1},
            "parallelism": {"tp": 1, "pp": 1, "dp": 8, "zero": 3, "recompute": "full"}}
    runs = {}
    for label, extra in (("none", {"recompute": "none"}), ("half", {"recompute_layers": 16}), ("full", {})):
        mapping = {**data, "parallelism": {**data["parallelism"], **extra}}
        s = scenario_from_mapping(mapping)
        r = simulate(s)
        dev = r.devices[0]
        recomputes = [x for x in dev.spans if x.name.startswith("R.")]
        analytic = memory_report(s.model, s.plan, s.cluster.gpu, s.memory)[0]
        runs[label] = (r.step_time_s, analytic.activations, len(recomputes))
        # one stage holds the logits too: the analytic sum adds them to the recomputation's workspace,
        # which the replay never holds at the same time, so it is the conservative one
        assert analytic.total * 0.9 <= dev.peak_bytes <= analytic.total * (1 + 1e-9)
    assert runs["half"][2] == 16 * 2 and runs["full"][2] == 32 * 2 and runs["none"][2] == 0
    assert runs["none"][0] < runs["half"][0] < runs["full"][0]
    assert runs["full"][1] < runs["half"][1] < runs["none"][1]



@pytest.mark.parametrize("shard", [4, 8])
def test_hybrid_sharding_gathers_in_the_shard_group_and_all_reduces_across_replicas(shard):
    # FSDP HYBRID_SHARD over 16 ranks: each layer's gather and reduce-scatter over `shard` ranks, then the
    # reduced shard (1 / shard of the layer's gradients) all-reduced over the 16 / shard replicas; the
    # symmetric replay agrees with the one of every device
    data = {"model": {"base": "llama3-8b", "layers": 4}, "cluster": {"topology": "dgx-h100", "nodes": 2},
            "training": {"seq_len": 2048, "global_batch_size": 32, "micro_batch_size": 1},
            "parallelism": {"tp": 1, "pp": 1, "dp": 16, "zero": 3, "dp_shard": shard}}
    s = scenario_from_mapping(data)
    from sim.workload import lower
    prog = lower(s.model, s.plan, s.memory, s.cluster.gpu)[0]
    gathers = [op.collective for op in prog.ops if op.name.endswith(".gather")]
    reduces = [op.collective for op in prog.ops if op.name.endswith(".grads")]
    replicas = [op.collective for op in prog.ops if op.name.endswith(".replicas")]
    assert {c.group for c in gathers} == {"dp_shard"} and {c.group for c in reduces} == {"dp_shard"}
    assert len(replicas) == len(reduces) + 1 and {c.group for c in replicas} == {"dp_replica"}
    assert replicas[0].size_bytes == pytest.approx(reduces[0].size_bytes / shard, rel=1e-12)
    sym, full = simulate(s), simulate(s, full=True)
    assert len(full.devices) == 16
    assert full.step_time_s == pytest.approx(sym.step_time_s, rel=1e-9)

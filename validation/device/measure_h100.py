"""Measure on one real GPU what the simulator predicts: GEMM rates across shapes, flash-attention
rates, DRAM bandwidth, kernel launch gaps, and the step time and peak memory of small Llama-style
training runs in PyTorch. Run on a lent H100 (``device`` tool) with:

    PYTHONUNBUFFERED=1 python3 validation/device/measure_h100.py --out $OUT

It writes one JSON file per part (gemm, attention, bandwidth, launch, training, env) and prints a
short summary. Everything is timed with CUDA events after warm-up, median of repeats, on random
data (never zeros). ``validation/device/compare.py`` sets the simulator's predictions beside them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import time
import traceback

import torch
import torch.nn as nn
import torch.nn.functional as F

DEV = "cuda"
BF16 = torch.bfloat16


def bench(fn, *, warmup: int = 3, reps: int = 10, min_time_s: float = 0.05) -> float:
    """Median seconds of ``fn()`` over repeats, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    start_all = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start_all < min_time_s and len(times) < 200):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def env_info() -> dict:
    p = torch.cuda.get_device_properties(0)
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": p.name,
            "sm_count": p.multi_processor_count, "memory_bytes": p.total_memory,
            "cudnn": torch.backends.cudnn.version(), "python": platform.python_version(),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,power.limit",
             "--format=csv"], capture_output=True, text=True, timeout=20).stdout
    except Exception as exc:  # noqa: BLE001
        info["nvidia_smi"] = repr(exc)
    return info


# --------------------------------------------------------------------------- GEMMs
def gemm_rate(m: int, n: int, k: int, kind: str = "nn", dtype: str = "bf16") -> float:
    """FLOP/s of C[m, n] = A[m, k] B[k, n] in the layout a training step uses:
    nn: forward of a linear layer (x @ W^T, W stored [n, k]); dgrad: dy @ W (W stored [k, n]);
    wgrad: dy^T @ x (both stored token-major, [k, m] and [k, n])."""
    if dtype == "fp8":
        a = torch.randn(m, k, device=DEV).to(torch.float8_e4m3fn)
        b = torch.randn(n, k, device=DEV).to(torch.float8_e4m3fn).t()   # column-major, as _scaled_mm needs
        one = torch.ones((), device=DEV)
        fn = lambda: torch._scaled_mm(a, b, one, one, out_dtype=BF16)  # noqa: E731
    elif kind == "nn":
        x, w = torch.randn(m, k, device=DEV, dtype=BF16), torch.randn(n, k, device=DEV, dtype=BF16)
        fn = lambda: F.linear(x, w)  # noqa: E731
    elif kind == "dgrad":
        dy, w = torch.randn(m, k, device=DEV, dtype=BF16), torch.randn(k, n, device=DEV, dtype=BF16)
        fn = lambda: dy @ w  # noqa: E731
    else:
        dy, x = torch.randn(k, m, device=DEV, dtype=BF16), torch.randn(k, n, device=DEV, dtype=BF16)
        fn = lambda: dy.t() @ x  # noqa: E731
    t = bench(fn)
    return 2.0 * m * n * k / t


def gemm_part() -> list[dict]:
    rows = []

    def add(group, m, n, k, kind="nn", dtype="bf16", **extra):
        try:
            r = gemm_rate(m, n, k, kind, dtype)
            rows.append({"group": group, "m": m, "n": n, "k": k, "kind": kind, "dtype": dtype,
                         "flop_per_s": r, **extra})
        except Exception as exc:  # noqa: BLE001
            rows.append({"group": group, "m": m, "n": n, "k": k, "kind": kind, "dtype": dtype,
                         "error": repr(exc)[:200], **extra})
        torch.cuda.empty_cache()

    for s in (2048, 4096, 8192, 12288, 16384):
        add("square", s, s, s)
        add("square", s, s, s, dtype="fp8")
    for k in (64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 4096, 8192, 16384, 32768):
        add("k_sweep", 8192, 8192, k)
        add("k_sweep", 8192, 8192, k, dtype="fp8")
    for n in range(256, 8192 + 1, 256):           # wave quantization: 4096 x n output tiles over the SMs
        add("n_sweep", 4096, n, 4096)
    for m in (256, 512, 1024, 2048, 3072, 4096, 6144, 8192, 16384, 32768):
        add("m_sweep", m, 8192, 8192)
    # training GEMMs of Llama-style layers: (hidden, ffn, heads, kv_heads) by TP degree and tokens
    models = {"h2048": (2048, 5632, 16, 16), "llama2-7b": (4096, 11008, 32, 32),
              "llama3-8b": (4096, 14336, 32, 8), "llama3-70b": (8192, 28672, 64, 8),
              "llama3-405b": (16384, 53248, 128, 8)}
    tps = {"h2048": (1,), "llama2-7b": (1, 2, 8), "llama3-8b": (1, 4), "llama3-70b": (1, 4, 8),
           "llama3-405b": (8,)}
    for name, (h, ffn, nh, nkv) in models.items():
        d = h // nh
        for tp in tps[name]:
            for tokens in (2048, 8192, 16384):
                for layer, (inp, out) in {"qkv": (h, (nh + 2 * nkv) * d // tp), "proj": (nh * d // tp, h),
                                          "fc1": (h, 2 * ffn // tp), "fc2": (ffn // tp, h)}.items():
                    add("training", tokens, out, inp, "nn", model=name, tp=tp, layer=layer, phase="fwd")
                    add("training", tokens, inp, out, "dgrad", model=name, tp=tp, layer=layer, phase="dgrad")
                    add("training", out, inp, tokens, "wgrad", model=name, tp=tp, layer=layer, phase="wgrad")
    return rows


# --------------------------------------------------------------------------- attention
def attention_row(batch: int, heads: int, seq: int, d: int, name: str, forward: bool = True) -> dict:
    """Causal bf16 attention through SDPA's ``name`` backend (flash, cudnn, efficient): forward + backward
    time and rate (3.5x the forward's 4·b·h·s²·d/2 FLOP), and with ``forward`` the forward's alone."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]
    row = {"seq": seq, "head_dim": d, "heads": heads, "batch": batch, "backend": name}
    try:
        q, k, v = (torch.randn(batch, heads, seq, d, device=DEV, dtype=BF16, requires_grad=True) for _ in range(3))
        g = torch.randn(batch, heads, seq, d, device=DEV, dtype=BF16)
        flop_f = 4.0 * batch * heads * seq * seq * d / 2     # causal: half the square
        with sdpa_kernel([backend]):
            def fwd_bwd():
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                torch.autograd.grad(o, (q, k, v), g)
            t_fb = bench(fwd_bwd)
            row.update({"fwd_bwd_s": t_fb, "fwd_bwd_flop_per_s": 3.5 * flop_f / t_fb})
            if forward:
                t_f = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
                row.update({"fwd_s": t_f, "fwd_flop": flop_f, "fwd_flop_per_s": flop_f / t_f,
                            "bwd_flop_per_s": 2.5 * flop_f / max(t_fb - t_f, 1e-9)})
    except Exception as exc:  # noqa: BLE001
        row["error"] = repr(exc)[:200]
    torch.cuda.empty_cache()
    return row


BACKENDS = ("flash", "cudnn", "efficient")


def attention_part() -> list[dict]:
    shapes = [(s, 128, 32) for s in (1024, 2048, 4096, 8192, 16384, 32768)] + \
             [(s, 64, 32) for s in (2048, 8192)] + [(8192, 128, 8)]
    return [{**attention_row(max(1, 16384 // seq), heads, seq, d, name), "causal": True}
            for seq, d, heads in shapes for name in BACKENDS]


def head_dim_part() -> list[dict]:
    """Attention rate by head dimension (MPT-30B's 112 among them) at 2k-8k tokens, 64 heads of
    batch x seq = 16k tokens: does a head dimension that is not a power of two cost more than its
    FLOPs, and more at long sequences?"""
    return [attention_row(16384 // seq, 64, seq, d, name, forward=False)
            for d in (64, 96, 112, 128) for seq in (2048, 4096, 8192) for name in BACKENDS]


# --------------------------------------------------------------------------- bandwidth and launches
def bandwidth_part() -> list[dict]:
    rows = []
    for gib in (0.25, 1, 4):
        n = int(gib * 2**30) // 2
        x = torch.randn(n, device=DEV, dtype=BF16)
        y = torch.empty_like(x)
        z = torch.randn(n, device=DEV, dtype=BF16)
        t = bench(lambda: y.copy_(x))
        rows.append({"op": "copy", "bytes_moved": 4 * n, "s": t, "bytes_per_s": 4 * n / t})
        t = bench(lambda: torch.add(x, z, out=y))
        rows.append({"op": "add", "bytes_moved": 6 * n, "s": t, "bytes_per_s": 6 * n / t})
        t = bench(lambda: x.float().sum())
        rows.append({"op": "sum_fp32_upcast", "bytes_moved": 2 * n + 8 * n, "s": t, "bytes_per_s": 10 * n / t})
        w = torch.randn(4096, device=DEV, dtype=BF16)
        xs = x[: (n // 4096) * 4096].view(-1, 4096)
        ys = y[: (n // 4096) * 4096].view(-1, 4096)
        t = bench(lambda: torch.nn.functional.rms_norm(xs, (4096,), w, 1e-5))
        rows.append({"op": "rms_norm", "bytes_moved": 4 * xs.numel(), "s": t, "bytes_per_s": 4 * xs.numel() / t})
        t = bench(lambda: torch.mul(F.silu(xs), ys))
        rows.append({"op": "silu_mul_eager", "bytes_moved": 10 * xs.numel(), "s": t,
                     "bytes_per_s": 10 * xs.numel() / t, "note": "2 kernels: silu (r+w) + mul (2r+w), 2 B each"})
        del x, y, z, xs, ys
        torch.cuda.empty_cache()
    return rows


def launch_part() -> list[dict]:
    rows = []
    x = torch.randn(1024, device=DEV)
    n = 2000
    for _ in range(200):
        x.add_(1.0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        x.add_(1.0)
    torch.cuda.synchronize()
    rows.append({"what": "eager tiny add_, wall clock per op (host-bound launch rate)",
                 "s_per_kernel": (time.perf_counter() - t0) / n})
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            x.add_(1.0)
        with torch.cuda.graph(g):
            for _ in range(n):
                x.add_(1.0)
    torch.cuda.current_stream().wait_stream(s)
    t = bench(lambda: g.replay(), warmup=2, reps=10)
    rows.append({"what": "CUDA graph of tiny add_, device time per kernel", "s_per_kernel": t / n})
    # back-to-back small memory-bound kernels in eager mode, device time: 8 MiB in, 8 MiB out
    y = torch.randn(2 * 2**20, device=DEV)
    z = torch.empty_like(y)

    def many():
        for _ in range(200):
            torch.mul(y, 1.0001, out=z)
    t = bench(many, warmup=2, reps=10)
    rows.append({"what": "eager 16 MiB scale kernels back to back, device time per kernel",
                 "s_per_kernel": t / 200, "bytes_per_kernel": 2 * y.numel() * 4})
    return rows


# --------------------------------------------------------------------------- training
class Block(nn.Module):
    def __init__(self, h: int, nh: int, ffn: int):
        super().__init__()
        self.nh, self.d = nh, h // nh
        self.norm1, self.norm2 = nn.RMSNorm(h, eps=1e-5), nn.RMSNorm(h, eps=1e-5)
        self.qkv = nn.Linear(h, 3 * h, bias=False)
        self.proj = nn.Linear(h, h, bias=False)
        self.fc1 = nn.Linear(h, 2 * ffn, bias=False)     # gate and up in one GEMM
        self.fc2 = nn.Linear(ffn, h, bias=False)

    def forward(self, x, cos, sin):
        b, s, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.nh, self.d).unbind(2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, h))
        gate, up = self.fc1(self.norm2(x)).chunk(2, dim=-1)
        return x + self.fc2(F.silu(gate) * up)


def rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Llama(nn.Module):
    def __init__(self, h, layers, nh, ffn, vocab, recompute):
        super().__init__()
        self.emb = nn.Embedding(vocab, h)
        self.blocks = nn.ModuleList(Block(h, nh, ffn) for _ in range(layers))
        self.norm = nn.RMSNorm(h, eps=1e-5)
        self.head = nn.Linear(h, vocab, bias=False)
        self.recompute, self.d = recompute, h // nh

    def loss(self, ids, labels):
        s = ids.shape[1]
        inv = 1.0 / (10000 ** (torch.arange(0, self.d, 2, device=ids.device).float() / self.d))
        ang = torch.outer(torch.arange(s, device=ids.device).float(), inv)
        cos = torch.cat((ang.cos(), ang.cos()), -1)[None, :, None, :].to(BF16)
        sin = torch.cat((ang.sin(), ang.sin()), -1)[None, :, None, :].to(BF16)
        x = self.emb(ids)
        for blk in self.blocks:
            if self.recompute:
                x = torch.utils.checkpoint.checkpoint(blk, x, cos, sin, use_reentrant=False)
            else:
                x = blk(x, cos, sin)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))


class MixedPrecisionAdam:
    """Megatron-LM's bf16 scheme: bf16 weights, fp32 gradient accumulation buffers (main_grad), fp32
    master weights and Adam moments (torch fused AdamW), weights re-cast after each step."""

    def __init__(self, model):
        self.params = [p for p in model.parameters()]
        self.master = [p.detach().float() for p in self.params]
        for m in self.master:
            m.grad = torch.zeros_like(m)
        for p, m in zip(self.params, self.master):
            p.register_post_accumulate_grad_hook(self._hook(m))
        self.opt = torch.optim.AdamW(self.master, lr=1e-5, weight_decay=0.1, fused=True)

    @staticmethod
    def _hook(m):
        def hook(p):
            m.grad.add_(p.grad)
            p.grad = None
        return hook

    def step(self):
        self.opt.step()
        try:
            torch._foreach_copy_(self.params, self.master)
        except Exception:  # noqa: BLE001  (older PyTorch: no cross-dtype foreach copy)
            for p, m in zip(self.params, self.master):
                p.data.copy_(m)
        for m in self.master:
            m.grad.zero_()


def run_guarded(cfg: dict, body) -> dict:
    """A copy of ``cfg`` that ``body(row)`` fills in; an out-of-memory or other failure is recorded in
    it instead, and the GPU memory is released after."""
    import gc
    torch.manual_seed(0)
    row = dict(cfg)
    try:
        body(row)
    except torch.OutOfMemoryError as exc:
        row["error"] = "OOM: " + str(exc)[:160]
    except Exception as exc:  # noqa: BLE001
        row["error"] = repr(exc)[:300] + traceback.format_exc()[-600:]
    torch.set_default_dtype(torch.float32)
    gc.collect()
    torch.cuda.empty_cache()
    return row


def train_run(cfg: dict, steps: int = 6) -> dict:
    """One plain-PyTorch training configuration: step time split into forward, backward and optimizer,
    peak memory, allocator retries (and with ``profile`` one profiled step)."""
    return run_guarded(cfg, lambda row: _train(cfg, row, steps))


def _train(cfg: dict, row: dict, steps: int) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with torch.device(DEV):
        model = Llama(cfg["hidden"], cfg["layers"], cfg["heads"], cfg["ffn"], cfg["vocab"],
                      cfg["recompute"]).to(BF16)
    opt = MixedPrecisionAdam(model)
    row["params"] = sum(p.numel() for p in model.parameters())
    b, s = cfg["mbs"], cfg["seq"]
    ids = torch.randint(0, cfg["vocab"], (b, s), device=DEV)
    labels = torch.randint(0, cfg["vocab"], (b, s), device=DEV)
    torch.cuda.synchronize()
    row["states_allocated_bytes"] = torch.cuda.memory_allocated()
    times, fwd, bwd, ost = [], [], [], []
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):   # FlashAttention-2, as PyTorch ships it
        for i in range(steps):
            if i == 2:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
            ev[0].record()
            loss = model.loss(ids, labels)
            ev[1].record()
            loss.backward()
            ev[2].record()
            opt.step()
            ev[3].record()
            ev[3].synchronize()
            if i >= 2:
                times.append(ev[0].elapsed_time(ev[3]) / 1e3)
                fwd.append(ev[0].elapsed_time(ev[1]) / 1e3)
                bwd.append(ev[1].elapsed_time(ev[2]) / 1e3)
                ost.append(ev[2].elapsed_time(ev[3]) / 1e3)
            del loss
        if cfg.get("profile"):
            from measure_hf import profile_step

            def step():
                model.loss(ids, labels).backward()
                opt.step()
            row["profile"] = profile_step(step)
    stats = torch.cuda.memory_stats()
    free, total = torch.cuda.mem_get_info()
    row.update({"step_s": statistics.median(times), "fwd_s": statistics.median(fwd),
                "bwd_s": statistics.median(bwd), "optimizer_s": statistics.median(ost),
                "step_s_all": times,
                "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
                "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
                "device_used_bytes_at_end": total - free,
                "alloc_retries": stats.get("num_alloc_retries", 0), "ooms": stats.get("num_ooms", 0),
                "tokens_per_s": b * s / statistics.median(times)})


# the two Llama-style models of the training runs (MHA, SwiGLU, vocabulary 32,000, untied)
H2048 = {"model": "h2048-L24", "hidden": 2048, "layers": 24, "heads": 16, "ffn": 5632, "vocab": 32000}
W4096 = {"model": "h4096-L8", "hidden": 4096, "layers": 8, "heads": 32, "ffn": 11008, "vocab": 32000}


def profile_part() -> list[dict]:
    """One profiled step of two plain-PyTorch runs (kernel count and device time vs wall time)."""
    return [train_run({**H2048, "seq": 2048, "mbs": 2, "recompute": False, "profile": True}),
            train_run({**W4096, "seq": 4096, "mbs": 2, "recompute": False, "profile": True})]


def training_part() -> list[dict]:
    runs = []
    for mbs in (2, 4, 8, 12, 16, 20, 24, 28, 32):          # up to and past the memory limit
        runs.append({**H2048, "seq": 2048, "mbs": mbs, "recompute": False})
    for mbs in (8, 16, 32):
        runs.append({**H2048, "seq": 2048, "mbs": mbs, "recompute": True})
    for seq, mbs in ((4096, 1), (4096, 2), (4096, 4), (8192, 1), (8192, 2)):
        runs.append({**W4096, "seq": seq, "mbs": mbs, "recompute": False})
    for seq, mbs in ((4096, 4), (8192, 4), (16384, 2)):
        runs.append({**W4096, "seq": seq, "mbs": mbs, "recompute": True})
    rows = []
    stop_no_recompute = False
    for cfg in runs:
        if stop_no_recompute and cfg["model"] == "h2048-L24" and not cfg["recompute"]:
            continue
        row = train_run(cfg)
        rows.append(row)
        if "error" in row and row["model"] == "h2048-L24" and not row["recompute"]:
            stop_no_recompute = True          # larger batches will not fit either
        print({k: row.get(k) for k in ("model", "seq", "mbs", "recompute", "step_s", "peak_allocated_bytes",
                                         "peak_reserved_bytes", "alloc_retries", "error")}, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--parts", default="env,bandwidth,launch,attention,gemm,training")
    args = ap.parse_args()
    parts = {"env": env_info, "bandwidth": bandwidth_part, "launch": launch_part,
             "attention": attention_part, "gemm": gemm_part, "training": training_part, "profile": profile_part,
             "head_dim": head_dim_part}
    for name in args.parts.split(","):
        t0 = time.perf_counter()
        try:
            result = parts[name]()
        except Exception as exc:  # noqa: BLE001
            result = {"error": repr(exc), "traceback": traceback.format_exc()}
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(f"== {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        if name == "gemm" and isinstance(result, list):
            for r in result:
                if r["group"] in ("square", "k_sweep") and "flop_per_s" in r:
                    print(r["group"], r["dtype"], r["m"], r["n"], r["k"], f"{r['flop_per_s'] / 1e12:.0f} TF")
        elif name == "attention" and isinstance(result, list):
            for r in result:
                print(r["backend"], r["seq"], r["head_dim"], r["heads"],
                      f"fwd {r.get('fwd_flop_per_s', math.nan) / 1e12:.0f} TF",
                      f"fwd+bwd {r.get('fwd_bwd_flop_per_s', math.nan) / 1e12:.0f} TF", r.get("error", ""))
        elif name in ("bandwidth", "launch", "env"):
            print(json.dumps(result, indent=None)[:2000])


if __name__ == "__main__":
    main()

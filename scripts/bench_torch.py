#!/usr/bin/env python3
"""PyTorch reference for examples/bench_train.rs: transformers' Qwen2 with the same configs,
batch 4 x seq 128, f32, forward + backward + AdamW (foreach), median of N steps after 1 warm-up.

    python3 -m venv .venv-bench && .venv-bench/bin/pip install torch transformers
    .venv-bench/bin/python scripts/bench_torch.py [--steps 3] [--threads 2] [--only tiny|135m]
"""
import argparse
import statistics
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

BATCH, SEQ = 4, 128


def config(hidden, layers, heads, kv_heads, inter, vocab):
    return Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, hidden_act="silu", attn_implementation="eager",
    )


def bench(name, cfg, steps):
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).float().train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, foreach=True)
    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ))
    fwd, bwd, step_t = [], [], []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        print(f"  {name} step {step}: loss {loss.item():.3f} fwd {t1-t0:.3f}s bwd {t2-t1:.3f}s adamw {t3-t2:.3f}s", flush=True)
        if step > 0:
            fwd.append(t1 - t0); bwd.append(t2 - t1); step_t.append(t3 - t2)
    f, b, o = statistics.median(fwd), statistics.median(bwd), statistics.median(step_t)
    total = f + b + o
    print(f"{name} (torch {torch.__version__}): params {params/1e6:.1f}M | fwd {f:.3f}s bwd {b:.3f}s adamw {o:.3f}s | step {total:.3f}s | {BATCH*SEQ/total:.1f} tok/s")


def matmul_rate(m, k, n):
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    times = []
    for _ in range(5):
        t = time.perf_counter(); a @ b; times.append(time.perf_counter() - t)
    return 2 * m * k * n / statistics.median(times) / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["tiny", "135m"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, batch {BATCH} x seq {SEQ}, median of {args.steps} steps after 1 warm-up")
    for m, k, n in [(512, 576, 1536), (1024, 1024, 1024), (2048, 2048, 2048)]:
        print(f"torch f32 matmul {m}x{k}.{k}x{n}: {matmul_rate(m, k, n):.1f} GFLOP/s")
    if args.only != "135m":
        bench("tiny", config(64, 2, 4, 2, 128, 320), max(args.steps, 5))
    if args.only != "tiny":
        bench("135M", config(576, 30, 9, 3, 1536, 49152), args.steps)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Load for scripts/bench-serve.sh: the official `openai` package (AsyncOpenAI, streaming,
`stream_options.include_usage`) sends chat completions at a fixed concurrency to any
OpenAI-compatible server and prints one JSON line: aggregate generated tokens per second,
request latency p50/p99 and time to first token p50/p99.

Answers are exactly MAX_TOKENS long on every server: the end-of-turn tokens (Qwen2.5's
<|im_end|> and <|endoftext|>) are banned with OpenAI's `logit_bias`, since a fine-tuned
student would otherwise stop after its one-word label.

Every request has the same system prompt and its own user message (so a prefix cache can
reuse the system prompt and nothing more): `short` prompts are ~30 tokens in all, `long`
ones ~170. Greedy, so every server generates the same answers from the same GGUF.

Two arrival shapes (BENCH_ARRIVAL):
- `burst` (default): REQUESTS requests sent at once, at most CONCURRENCY in flight: every
  prompt of a round arrives in the same instant, so the last one's first token waits for
  all their prefills.
- `staggered`: CONCURRENCY clients, each sending BENCH_ROUNDS (default 4) requests back to
  back, their first requests spread evenly over one unloaded request's latency (measured
  here first), as independent users arrive. The first round (the ramp-up) is not counted:
  figures cover rounds 2.., and throughput is their generated tokens over the span from the
  first counted request's start to the last one's end. REQUESTS is ignored.

usage: bench_serve_load.py BASE_URL CONCURRENCY REQUESTS {short|long} [MAX_TOKENS=32] [OFFSET=0]
"""
import asyncio
import json
import os
import statistics
import sys
import time

import httpx
import openai

SYSTEM = "You are a store's support agent. Answer in detail."
TOPICS = [
    "my payout from last week", "a customer's return label", "the webhook for new orders",
    "two-factor codes on my phone", "stock counts after an import", "the theme's product images",
    "a parcel lost in transit", "the VAT number on invoices", "a staff member's access",
    "the free shipping rule", "an exchange for another size", "the checkout page",
]
DETAILS = (
    "I changed nothing in the settings since last month and it worked until Tuesday. "
    "Two of my staff members looked at it and could not find the cause either, and the help "
    "page did not cover this case. We sell about forty orders a day, mostly to customers in "
    "Germany and France, and this week we start a sale, so I need this fixed before Friday. "
    "I attached nothing because the page shows no error message at all, it simply does not "
    "do what it did before. Could you tell me what to check first, and whether anything on "
    "your side changed recently that would explain it? Thank you for the quick help, and "
    "please write the steps as a numbered list."
)


# BENCH_BAN_EOS=0 for models with another vocabulary (the random fixture).
END_OF_TURN_BAN = {"151645": -100, "151643": -100} if os.environ.get("BENCH_BAN_EOS", "1") == "1" else None


def prompt(i: int, kind: str) -> list:
    topic = TOPICS[i % len(TOPICS)]
    user = f"Ticket {1000 + i}: {topic}?"
    if kind == "long":
        user += " " + DETAILS
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def main() -> None:
    base_url, concurrency, requests, kind = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    max_tokens = int(sys.argv[5]) if len(sys.argv) > 5 else 32
    offset = int(sys.argv[6]) if len(sys.argv) > 6 else 0
    client = openai.AsyncOpenAI(
        base_url=base_url,
        api_key="bench",
        max_retries=0,
        timeout=600,
        http_client=openai.DefaultAsyncHttpxClient(
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        ),
    )
    semaphore = asyncio.Semaphore(concurrency)
    rows = []

    failures = []

    async def one(i: int, counted: bool = True) -> None:
        try:
            await attempt(i, counted)
        except Exception as e:  # noqa: BLE001 - a server that fails is reported, not fatal
            failures.append(f"{type(e).__name__}: {e}")

    async def attempt(i: int, counted: bool = True) -> None:
        async with semaphore:
            start = time.perf_counter()
            first = None
            tokens = 0
            chunks = 0
            stream = await client.chat.completions.create(
                model="bench",
                messages=prompt(offset + i, kind),
                temperature=0,
                max_tokens=max_tokens,
                stream=True,
                stream_options={"include_usage": True},
                logit_bias=END_OF_TURN_BAN,
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    chunks += 1
                    if first is None:
                        first = time.perf_counter()
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            end = time.perf_counter()
            if counted:
                rows.append((end - start, (first or end) - start, tokens or chunks, start, end))

    arrival = os.environ.get("BENCH_ARRIVAL", "burst")
    if arrival == "staggered":
        rounds = int(os.environ.get("BENCH_ROUNDS", "4"))
        probe = time.perf_counter()
        await attempt(offset + 10_000, counted=False)
        spacing = (time.perf_counter() - probe) / concurrency

        async def user(c: int) -> None:
            await asyncio.sleep(c * spacing)
            for r in range(rounds):
                await one(offset + r * concurrency + c, counted=r > 0)

        await asyncio.gather(*(user(c) for c in range(concurrency)))
        wall = (max(r[4] for r in rows) - min(r[3] for r in rows)) if rows else 0.0
    else:
        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.perf_counter() - start
    if not rows:
        print(json.dumps({"concurrency": concurrency, "prompt": kind, "arrival": arrival, "requests": 0, "failed": len(failures),
                          "error": failures[0] if failures else None}))
        return
    latency = [r[0] * 1000 for r in rows]
    ttft = [r[1] * 1000 for r in rows]
    generated = sum(r[2] for r in rows)
    print(json.dumps({
        "concurrency": concurrency,
        "prompt": kind,
        "arrival": arrival,
        "requests": len(rows),
        "failed": len(failures),
        "generated_tokens": generated,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(generated / wall, 2),
        "latency_p50_ms": round(statistics.median(latency), 1),
        "latency_p99_ms": round(percentile(latency, 0.99), 1),
        "ttft_p50_ms": round(statistics.median(ttft), 1),
        "ttft_p99_ms": round(percentile(ttft, 0.99), 1),
    }))


if __name__ == "__main__":
    asyncio.run(main())

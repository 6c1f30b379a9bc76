#!/usr/bin/env python3
"""Comparison client: the official `openai` package (AsyncOpenAI, asyncio) labeling the same
prompts against the same mock, same concurrency. Prints one JSON line like bench_label.

usage: bench_openai.py BASE_URL [N] [CONCURRENCY] [LATENCY_MS]
"""
import asyncio
import json
import resource
import sys
import time

import openai


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def main() -> None:
    base_url = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
    concurrency = int(sys.argv[3]) if len(sys.argv) > 3 else 128
    latency_ms = float(sys.argv[4]) if len(sys.argv) > 4 else 50.0
    client = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=30)
    # Ensure the connection pool is not the bottleneck (httpx defaults to 100 connections).
    try:
        import httpx

        client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key="bench",
            max_retries=0,
            timeout=30,
            http_client=openai.DefaultAsyncHttpxClient(
                limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
            ),
        )
    except Exception:  # noqa: BLE001 - fall back to the default client
        pass
    semaphore = asyncio.Semaphore(concurrency)
    labels = [None] * n

    async def one(i: int) -> None:
        async with semaphore:
            r = await client.chat.completions.create(
                model="mock",
                messages=[
                    {"role": "system", "content": "Classify the merchant question into billing, shipping or other."},
                    {"role": "user", "content": f"Question number {i}: where is my order?"},
                ],
                temperature=0,
                max_tokens=16,
            )
            labels[i] = r.choices[0].message.content

    cpu_before = cpu_seconds()
    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - start
    cpu = cpu_seconds() - cpu_before
    done = sum(1 for x in labels if x is not None)
    ideal = concurrency / (latency_ms / 1000.0)
    print(json.dumps({
        "client": f"python-openai-{openai.__version__}",
        "n": done,
        "concurrency": concurrency,
        "wall_s": round(wall, 3),
        "req_per_s": round(done / wall, 1),
        "ideal_req_per_s": ideal,
        "efficiency": round(done / wall / ideal, 4),
        "cpu_s": round(cpu, 3),
        "cpu_us_per_call": round(cpu / done * 1e6, 1),
    }))


if __name__ == "__main__":
    asyncio.run(main())

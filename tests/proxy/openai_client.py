"""The official `openai` package, unchanged, against `tangle proxy`.

Usage: openai_client.py MODE BASE_URL API_KEY MODEL
Prints one JSON document describing what the client saw. Modes:
  basic      a completion, a streamed completion with usage, the models list, a bad key
  midstream  a streamed completion whose upstream fails after the first token
  breaker    a completion refused by a tripped breaker (default retries left on)
"""

import json
import sys

import openai

MESSAGES = [
    {"role": "system", "content": "Classify."},
    {"role": "user", "content": "where is my parcel"},
]


def basic(base, key, model):
    client = openai.OpenAI(base_url=base, api_key=key, max_retries=0)
    out = {}
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16)
    out["text"] = r.choices[0].message.content
    out["finish_reason"] = r.choices[0].finish_reason
    out["total_tokens"] = r.usage.total_tokens
    out["model"] = r.model
    pieces, finish, usage = [], None, None
    stream = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=16, stream=True, stream_options={"include_usage": True}
    )
    for chunk in stream:
        if chunk.choices:
            if chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            if chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        if chunk.usage:
            usage = chunk.usage.total_tokens
    out["stream_pieces"] = pieces
    out["stream_finish_reason"] = finish
    out["stream_total_tokens"] = usage
    out["models"] = sorted(m.id for m in client.models.list())
    try:
        openai.OpenAI(base_url=base, api_key="not-a-proxy-key-000", max_retries=0).chat.completions.create(
            model=model, messages=MESSAGES
        )
        out["bad_key"] = "accepted"
    except openai.AuthenticationError as e:
        out["bad_key"] = e.status_code
    return out


def midstream(base, key, model):
    client = openai.OpenAI(base_url=base, api_key=key, max_retries=0)
    pieces = []
    try:
        for chunk in client.chat.completions.create(model=model, messages=MESSAGES, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
        return {"pieces": pieces, "error": None}
    except openai.APIError as e:
        return {"pieces": pieces, "error": type(e).__name__, "message": e.message}


def breaker(base, key, model):
    # Default retries: the proxy's `x-should-retry: false` must stop them.
    client = openai.OpenAI(base_url=base, api_key=key)
    try:
        client.chat.completions.create(model=model, messages=MESSAGES)
        return {"error": None}
    except openai.RateLimitError as e:
        return {"error": type(e).__name__, "status": e.status_code, "code": e.code, "message": e.message}


if __name__ == "__main__":
    mode, base, key, model = sys.argv[1:5]
    print(json.dumps({"basic": basic, "midstream": midstream, "breaker": breaker}[mode](base, key, model)))

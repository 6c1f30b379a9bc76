#!/usr/bin/env python3
"""mistral.rs (PyPI `mistralrs`) behind an OpenAI-compatible `/v1/chat/completions`, for
scripts/bench-serve.sh: the wheel ships the engine as a Python extension, not a server.

The wrapper is a thread per connection that hands the request to mistral.rs's Runner (its
scheduler batches concurrent requests, as its own server does) and relays the stream; it
adds well under a millisecond per chunk, far below the per-token times measured.

usage: scripts/mistralrs_server.py MODEL.gguf PORT [MAX_SEQS]
"""
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import mistralrs

gguf, port = sys.argv[1], int(sys.argv[2])
max_seqs = int(sys.argv[3]) if len(sys.argv) > 3 else 32
runner = mistralrs.Runner(
    which=mistralrs.Which.GGUF(
        quantized_model_id=os.path.dirname(os.path.abspath(gguf)),
        quantized_filename=os.path.basename(gguf),
    ),
    max_seqs=max_seqs,
    token_source="none",
)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = b'{"status":"ok"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        stream = bool(request.get("stream"))
        chunks = runner.send_chat_completion_request(
            mistralrs.ChatCompletionRequest(
                model="default",
                messages=request["messages"],
                max_tokens=request.get("max_tokens"),
                temperature=request.get("temperature"),
                stream=stream,
                logit_bias={int(k): v for k, v in (request.get("logit_bias") or {}).items()} or None,
            )
        )
        if not stream:
            r = chunks
            body = json.dumps(
                {
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": r.choices[0].message.content}}],
                    "usage": {"prompt_tokens": r.usage.prompt_tokens, "completion_tokens": r.usage.completion_tokens},
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        tokens = 0

        def send(obj):
            data = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        for chunk in chunks:
            delta = chunk.choices[0].delta.content if chunk.choices else None
            if delta:
                tokens += 1
                send({"created": int(time.time()), "choices": [{"index": 0, "delta": {"content": delta}}]})
        send({"choices": [], "usage": {"completion_tokens": tokens}})
        send(b"[DONE]")
        self.wfile.write(b"0\r\n\r\n")


ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()

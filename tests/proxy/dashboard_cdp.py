"""Drives the proxy dashboard in headless Chromium over the DevTools protocol.

Usage: dashboard_cdp.py CHROMIUM DASHBOARD_URL BREAKER_ID SCREENSHOT_DIR
Talks over stdin/stdout with the Rust test:
  -> prints READY once the page shows BREAKER_ID closed
  <- waits for a line GO (the test then trips the breaker)
  -> measures until the page shows it tripped, screenshots, clicks its Confirm button with
     real mouse events, waits until the page shows it closed again, screenshots, and
     prints one JSON line with the timings.
Only the standard library: a minimal WebSocket client is enough for CDP.
"""

import base64
import json
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request


class WebSocket:
    def __init__(self, url):
        u = urllib.parse.urlparse(url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise RuntimeError("websocket handshake: connection closed")
            head += chunk
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise RuntimeError(f"websocket handshake refused: {head!r}")

    def _exact(self, n):
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise RuntimeError("websocket closed")
            data += chunk
        return data

    def send(self, text):
        data = text.encode()
        header = bytearray([0x81])
        n = len(data)
        if n < 126:
            header.append(0x80 | n)
        elif n < 65536:
            header.append(0x80 | 126)
            header += struct.pack(">H", n)
        else:
            header.append(0x80 | 127)
            header += struct.pack(">Q", n)
        mask = os.urandom(4)
        header += mask
        self.sock.sendall(bytes(header) + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def recv(self):
        message = b""
        while True:
            b0, b1 = self._exact(2)
            opcode, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._exact(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._exact(8))[0]
            payload = self._exact(n)
            if opcode == 8:
                raise RuntimeError("websocket closed by the browser")
            if opcode in (9, 10):
                continue
            message += payload
            if b0 & 0x80:
                return message.decode()


class Page:
    def __init__(self, ws_url):
        self.ws = WebSocket(ws_url)
        self.next_id = 0

    def call(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def eval(self, expression):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return r.get("result", {}).get("value")

    def screenshot(self, path):
        data = self.call("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))


def state_of(page, breaker):
    sel = json.dumps(f'tr[data-breaker="{breaker}"] td[data-role="state"]')
    return page.eval(f"(document.querySelector({sel}) || {{}}).textContent || null")


def wait_for(page, breaker, wanted, timeout):
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if state_of(page, breaker) == wanted:
            return time.monotonic() - start
        time.sleep(0.02)
    raise RuntimeError(f"{breaker} never showed `{wanted}` (last: {state_of(page, breaker)!r})")


def main():
    chromium, url, breaker, shots = sys.argv[1:5]
    os.makedirs(shots, exist_ok=True)
    profile = tempfile.mkdtemp(prefix="tangle-cdp-")
    browser = subprocess.Popen(
        [
            chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--remote-debugging-port=0", f"--user-data-dir={profile}",
            "--window-size=1280,1000", url,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = browser.stderr.readline()
            if not line and browser.poll() is not None:
                raise RuntimeError("chromium exited before DevTools started")
            m = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if m:
                port = int(m.group(1))
        if port is None:
            raise RuntimeError("chromium did not report its DevTools port")
        ws_url = None
        while ws_url is None and time.monotonic() < deadline:
            targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
            pages = [t for t in targets if t.get("type") == "page" and t.get("url", "").startswith(url)]
            ws_url = pages[0]["webSocketDebuggerUrl"] if pages else None
            if ws_url is None:
                time.sleep(0.1)
        page = Page(ws_url)
        wait_for(page, breaker, "closed", 30)
        print("READY", flush=True)
        if sys.stdin.readline().strip() != "GO":
            raise RuntimeError("expected GO")
        appeared = wait_for(page, breaker, "tripped", 10)
        page.screenshot(os.path.join(shots, "dashboard-tripped.png"))
        sel = json.dumps(f'button[data-confirm="{breaker}"]')
        box = page.eval(
            f"(() => {{ const b = document.querySelector({sel}); if (!b) return null; b.scrollIntoView();"
            " const r = b.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        if box is None:
            raise RuntimeError("no Confirm button for the tripped breaker")
        x, y = box
        page.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        page.call("Input.dispatchMouseEvent", type="mousePressed", x=x, y=y, button="left", clickCount=1)
        page.call("Input.dispatchMouseEvent", type="mouseReleased", x=x, y=y, button="left", clickCount=1)
        reopened = wait_for(page, breaker, "closed", 10)
        notice = page.eval("document.getElementById('notice').textContent")
        page.screenshot(os.path.join(shots, "dashboard-confirmed.png"))
        print(json.dumps({"appeared_s": appeared, "reopened_s": reopened, "notice": notice}), flush=True)
    finally:
        browser.kill()
        browser.wait()


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # the Rust test shows this line
        print(json.dumps({"error": str(e)}), flush=True)
        sys.exit(1)

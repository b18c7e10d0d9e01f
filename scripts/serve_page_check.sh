#!/usr/bin/env bash
# The page at / of `lazarus serve`, checked in headless Chromium.
#
#   bash scripts/serve_page_check.sh [SHOT]
#
# Builds lazarus (scripts/build.sh), trains a small classifier on generated
# images in a temp root (random-weight Lite0: nothing is downloaded),
# exports it and serves the bundle on a free loopback port. Then Debian's
# `chromium` (apt-get install -y chromium; networking features off, a fresh
# profile) opens the page, and the DevTools protocol (over
# --remote-debugging-pipe, Python's standard library only) chooses an image
# with the page's file input as a user would. The script checks that the
# page lists the model, shows the answer (top class, one bar per class,
# the request id), that no request left 127.0.0.1 and no script error
# occurred, and takes a screenshot (SHOT, default: the cargo target
# folder's serve-page.png) in which it looks for the header and the
# probability bars.
set -euo pipefail
cd "$(dirname "$0")/.."
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
shot="${1:-$target/serve-page.png}"
browser=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$browser" ]; then
  echo "chromium not found: apt-get install -y chromium" >&2
  exit 1
fi
bin=$(bash scripts/build.sh)

work=$(mktemp -d)
server=""
cleanup() {
  if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# Two classes of 48x48 images: light and dark, with noise.
python3 - "$work/tree" <<'EOF'
import os, random, struct, sys, zlib
def png(path, pixels, size):
    raw = b"".join(b"\x00" + bytes(pixels[y * size * 3:(y + 1) * size * 3]) for y in range(size))
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0))
    data += chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    open(path, "wb").write(data)
random.seed(7)
for label, base in (("light", 190), ("dark", 60)):
    os.makedirs(f"{sys.argv[1]}/{label}", exist_ok=True)
    for i in range(16):
        pixels = [max(0, min(255, base + random.randint(-40, 40))) for _ in range(48 * 48 * 3)]
        png(f"{sys.argv[1]}/{label}/{i:02}.png", pixels, 48)
EOF
root="$work/root"
"$bin" --root "$root" dataset add shapes "$work/tree" >/dev/null
"$bin" --root "$root" enqueue --dataset shapes --encoder efficientnet-lite0 --weights random:3 >/dev/null
"$bin" --root "$root" run-worker --until-empty >/dev/null
run=$("$bin" --root "$root" train --dataset shapes --encoder efficientnet-lite0 --epochs 3 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["run_id"])')
"$bin" --root "$root" export "$run" --out "$work/shapes" >/dev/null

"$bin" --root "$root" serve --bundle "$work/shapes" --addr 127.0.0.1:0 >"$work/serve.log" 2>&1 &
server=$!
for _ in $(seq 1 600); do
  grep -q '^ready$' "$work/serve.log" && break
  kill -0 "$server" 2>/dev/null || { cat "$work/serve.log" >&2; exit 1; }
  sleep 0.1
done
url=$(sed -n 's#^listening on \(http://.*\)$#\1/#p' "$work/serve.log")
echo "serving $url"

mkdir -p "$(dirname "$shot")"
python3 - "$browser" "$url" "$work/tree/light/00.png" "$shot" "$work/profile" <<'EOF'
import base64, json, os, subprocess, sys, time
sys.dont_write_bytecode = True  # no __pycache__ in scripts/
sys.path.insert(0, "scripts")
from png_pixels import near, pixels
browser, url, image, shot, profile = sys.argv[1:6]

# DevTools over a pipe: the browser reads commands on fd 3 and writes
# answers and events on fd 4, each a JSON text ended by a NUL byte.
commands_read, commands_write = os.pipe()
answers_read, answers_write = os.pipe()
def child_fds():
    import fcntl
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (commands_read, answers_write)]
    for fd, target in zip(high, (3, 4)):
        os.dup2(fd, target)
        os.set_inheritable(target, True)
browser_process = subprocess.Popen(
    [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
     "--disable-background-networking", "--disable-component-update", "--disable-sync",
     f"--user-data-dir={profile}", "--hide-scrollbars", "--remote-debugging-pipe", "about:blank"],
    preexec_fn=child_fds, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
os.close(commands_read)
os.close(answers_write)
buffer, events, next_id = b"", [], [0]

def receive(deadline):
    global buffer
    while b"\0" not in buffer:
        if time.time() > deadline:
            raise SystemExit("no answer from chromium")
        data = os.read(answers_read, 1 << 16)
        if not data:
            raise SystemExit("chromium closed the pipe")
        buffer += data
    message, buffer = buffer.split(b"\0", 1)
    return json.loads(message)

def send(method, params=None, session=None, timeout=30):
    next_id[0] += 1
    message = {"id": next_id[0], "method": method, "params": params or {}}
    if session:
        message["sessionId"] = session
    os.write(commands_write, json.dumps(message).encode() + b"\0")
    deadline = time.time() + timeout
    while True:
        reply = receive(deadline)
        if reply.get("id") == next_id[0]:
            if "error" in reply:
                raise SystemExit(f"{method}: {reply['error']}")
            return reply.get("result", {})
        events.append(reply)

def wait_event(method, timeout=30):
    deadline = time.time() + timeout
    while True:
        for event in events:
            if event.get("method") == method:
                events.remove(event)
                return event
        events.append(receive(deadline))

def evaluate(session, expression):
    result = send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
    return result["result"].get("value")

def poll(session, expression, what, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = evaluate(session, expression)
        if value:
            return value
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")

try:
    target = next(t for t in send("Target.getTargets")["targetInfos"] if t["type"] == "page")
    session = send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})["sessionId"]
    for domain in ("Page", "Runtime", "Network", "DOM"):
        send(f"{domain}.enable", session=session)
    send("Emulation.setDeviceMetricsOverride",
         {"width": 1100, "height": 820, "deviceScaleFactor": 1, "mobile": False}, session)
    send("Page.navigate", {"url": url}, session)
    wait_event("Page.loadEventFired")
    poll(session, "document.getElementById('ready').textContent.includes('ready') && "
                  "document.getElementById('model').options.length", "the model list")
    model = evaluate(session, "document.getElementById('model').value")
    document = send("DOM.getDocument", session=session)["root"]["nodeId"]
    file_input = send("DOM.querySelector", {"nodeId": document, "selector": "#file"}, session)["nodeId"]
    send("DOM.setFileInputFiles", {"files": [image], "nodeId": file_input}, session)
    status = poll(session, "(document.getElementById('status').textContent.startsWith('request ') && "
                           "document.getElementById('status').textContent) || "
                           "(document.querySelector('#result .error') || {}).textContent",
                  "the answer")
    if not status.startswith("request "):
        raise SystemExit(f"the page shows an error: {status}")
    verdict = evaluate(session, "document.querySelector('#result .verdict').textContent")
    bar_count = evaluate(session, "document.querySelectorAll('#result .bar').length")
    answer = json.loads(evaluate(session, "document.getElementById('json').textContent"))
    print(f"model {model}: {verdict}; {bar_count} bars; {status}")
    assert model == "shapes", model
    assert verdict == answer["predictions"][0]["top"][0][0], (verdict, answer)
    assert bar_count == 2, bar_count
    time.sleep(0.3)
    png = base64.b64decode(send("Page.captureScreenshot", {"format": "png"}, session)["data"])
    open(shot, "wb").write(png)
    requested = [e["params"]["request"]["url"] for e in events if e.get("method") == "Network.requestWillBeSent"]
    errors = [e["params"] for e in events if e.get("method") == "Runtime.exceptionThrown"]
    assert not errors, errors
    outside = [u for u in requested if not u.startswith(("http://127.0.0.1:", "data:", "blob:"))]
    assert not outside, f"requests beyond 127.0.0.1: {outside}"
    print(f"{len(requested)} requests, all to 127.0.0.1 (or data:/blob:)")
finally:
    try:
        send("Browser.close", timeout=5)
    except SystemExit:
        pass
    browser_process.wait(timeout=10)

# The screenshot: the dark header and the blue probability bars are drawn.
image_pixels = pixels(shot)
header = sum(1 for p in image_pixels if near(p, (17, 24, 39), 30))
bars = sum(1 for p in image_pixels if near(p, (37, 99, 235), 30))
print(f"{shot}: {len(image_pixels)} pixels, header {header}, bars {bars}")
assert header > 20000, "the header bar is not drawn"
assert bars > 300, "no probability bar is drawn"
print("the page shows the model's answer")
EOF
kill -TERM "$server"
wait "$server"
server=""
tail -n 1 "$work/serve.log"

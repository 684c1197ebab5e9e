"""`mmmamba serve` end to end: the app on 127.0.0.1 (a free port), its event stream over HTTP, and the page driven
in headless Chromium (Debian's browser through playwright): upload an image, send a prompt, see the answer stream in.

Under CI=true a missing browser or driver fails the test instead of skipping it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "inference"))
from chat_models import write_png, write_tiny_vlm  # noqa: E402

from mmmamba.io import load_model  # noqa: E402
from mmmamba.models.tokenizer import load_tokenizer  # noqa: E402

CHROMIUM = os.environ.get("MMMAMBA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT_DIR = os.environ.get("MMMAMBA_SCREENSHOT_DIR")  # keep the page's screenshots there (docs)


def _need(what: str, ok: bool, hint: str) -> None:
    if ok:
        return
    msg = f"{what} is not available ({hint})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the browser test: {msg}")
    pytest.skip(msg)


class SlowRunner:
    """The model, with a pause after each streamed token so the page can be seen filling in."""

    def __init__(self, model, pause: float = 0.03):
        self.model, self.pause = model, pause

    def generate(self, *args, streamer=None, **kwargs):
        class Slow:
            def put(_, ids):
                streamer.put(ids)
                time.sleep(self.pause)

            def end(_):
                streamer.end()

        return self.model.generate(*args, streamer=Slow() if streamer is not None else None, **kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    try:
        import uvicorn

        from mmmamba.serve import create_app
    except ImportError as e:
        _need("the web stack", False, f"{e}; pip install 'mmmamba[serve]'")

    d = write_tiny_vlm(tmp_path_factory.mktemp("serve") / "tiny-vlm")
    model = load_model(d)
    app = create_app(model, load_tokenizer(d), SlowRunner(model), title="tiny-vlm",
                     conversation_kwargs=dict(max_new_tokens=24, max_tiles=2))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and t.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{srv.config.port}"
    srv.should_exit = True
    t.join(timeout=15)
    assert not t.is_alive(), "the server did not shut down"


def _post(url: str, body: dict):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=60)


def test_event_stream_over_http(server):
    info = json.load(urllib.request.urlopen(server + "/api/info", timeout=10))
    assert info["vision"] and info["memory"]["rss_mib"] > 0 and info["device"] == "cpu"
    with _post(server + "/api/chat", {"session": "http", "message": "hello what is this"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [block for block in r.read().decode().split("\n\n") if block]
    kinds = [b.split("\n")[0] for b in events]
    assert kinds[-1] == "event: done" and kinds.count("event: token") >= 2
    done = json.loads(events[-1].split("data: ", 1)[1])
    tokens = "".join(json.loads(b.split("data: ", 1)[1])["text"] for b in events[:-1])
    assert done["tokens"] == 24 and done["tokens_per_s"] > 0 and done["memory"]["rss_mib"] > 0
    assert tokens.strip() == done["text"]
    with pytest.raises(urllib.error.HTTPError) as e:
        _post(server + "/api/chat", {"session": "http", "message": "  "})
    assert e.value.code == 400


def test_a_client_leaving_mid_answer_does_not_break_the_next(server):
    r = _post(server + "/api/chat", {"session": "leaver", "message": "hello"})
    assert r.read(20)  # the first event arrived; now hang up
    r.close()
    with _post(server + "/api/chat", {"session": "next", "message": "tell me more"}) as r2:
        body = r2.read().decode()
    assert "event: done" in body and '"tokens": 24' in body


def test_browser_chat_with_image(server, tmp_path):
    _need("chromium", CHROMIUM is not None, "apt-get install chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need("playwright", False, "pip install playwright; its browsers are not needed")
    png = write_png(tmp_path / "cat.png", 60, 40)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"], timeout=60000)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 640})
            page.set_default_timeout(60000)
            page.goto(server + "/")
            page.wait_for_function("document.getElementById('stats').textContent.includes('RSS')")
            assert "tiny-vlm" in page.inner_text("#model")
            # record each change of the answer as it streams in
            page.evaluate("""() => { window.seen = [];
                new MutationObserver(() => { const a = document.querySelector('.msg.assistant:last-of-type');
                  if (a) window.seen.push([a.textContent.length, a.dataset.done || '']); })
                .observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true}); }""")
            page.set_input_files("#image", str(png))
            page.fill("#message", "describe the image please")
            page.click("#send")
            page.wait_for_selector(".msg.assistant[data-done='1']")
            answer = page.inner_text(".msg.assistant")
            assert answer.strip()
            assert page.locator(".msg.user img").count() == 1
            seen = page.evaluate("window.seen")
            partial = {n for n, done in seen if not done and n > 0}
            assert len(partial) >= 3, seen  # the answer grew in steps before it was done: streamed
            stats = page.inner_text("#stats")
            assert "24 tokens" in stats and "tokens/s" in stats and "RSS" in stats
            if SCREENSHOT_DIR:
                page.screenshot(path=str(Path(SCREENSHOT_DIR) / "serve.png"))
            # a broken image: a clear message, and the conversation goes on
            page.set_input_files("#image", str(bad))
            page.fill("#message", "and this one")
            page.click("#send")
            page.wait_for_selector(".msg.error")
            assert "broken.png could not be read as an image" in page.inner_text(".msg.error")
            page.fill("#message", "tell me more")
            page.click("#send")
            page.wait_for_function("document.querySelectorAll(\".msg.assistant[data-done='1']\").length == 2")
            page.click("#reset")
            page.wait_for_selector("text=conversation reset")
        finally:
            browser.close()


def test_cli_serve_builds_the_app_for_a_folder(tmp_path, monkeypatch, capsys):
    import mmmamba.serve
    from mmmamba.cli import main

    got = {}
    monkeypatch.setattr(mmmamba.serve, "serve", lambda app, host, port: got.update(app=app, host=host, port=port))
    d = write_tiny_vlm(tmp_path / "m")
    assert main(["serve", "--model", str(d), "--device", "cpu", "--port", "8123", "--max-new-tokens", "7"]) == 0
    assert got["host"] == "127.0.0.1" and got["port"] == 8123
    assert "http://127.0.0.1:8123/" in capsys.readouterr().out
    assert {r.path for r in got["app"].routes} >= {"/", "/api/info", "/api/image", "/api/chat", "/api/reset"}

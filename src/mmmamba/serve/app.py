"""`mmmamba serve`: a small web demo (FastAPI + one plain HTML page). Upload an image, chat, answers streamed as
server-sent events, with tokens/s and memory (process RSS; CUDA memory when on GPU).

One model serves every browser tab: each tab has its own `Conversation` (keyed by a session id the page makes),
and one generation runs at a time (a lock), so tokens/s and memory are those of a single request.

API: GET / (the page); GET /api/info; POST /api/image (multipart: session, file); POST /api/reset (JSON: session);
POST /api/chat (JSON: session, message) -> text/event-stream of `token` events ({"text"}), then one `done`
({"text", "tokens", "seconds", "tokens_per_s", "notice", "dropped", "memory"}) or `error` ({"error"})."""

from __future__ import annotations

import io
import json
import threading
from importlib import resources
from typing import Annotated

import torch
from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from fastapi.responses import HTMLResponse, StreamingResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel

from ..inference.chat import Conversation


class ChatRequest(BaseModel):
    session: str
    message: str


class ResetRequest(BaseModel):
    session: str


def memory_stats(device: torch.device | None = None) -> dict:
    """Process resident memory (MiB) and, on CUDA, allocated / peak / reserved GPU memory (MiB)."""
    import psutil

    out = {"rss_mib": round(psutil.Process().memory_info().rss / 2**20, 1)}
    if device is not None and device.type == "cuda":
        out["cuda_allocated_mib"] = round(torch.cuda.memory_allocated(device) / 2**20, 1)
        out["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        out["cuda_reserved_mib"] = round(torch.cuda.memory_reserved(device) / 2**20, 1)
    return out


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def create_app(model, tokenizer, runner=None, *, title: str = "mmmamba", conversation_kwargs: dict | None = None,
               max_sessions: int = 64):
    """The FastAPI app serving `model` (MMMambaForCausalLM) through `runner` (the model or its Engine)."""
    from transformers import TextIteratorStreamer

    app = FastAPI(title=f"{title} demo")
    sessions: dict[str, Conversation] = {}
    lock = threading.Lock()
    kw = conversation_kwargs or {}
    page = resources.files(__package__).joinpath("page.html").read_text().replace("{{TITLE}}", title)
    has_vision = getattr(model.config, "vision_config", None) is not None

    def conversation(sid: str) -> Conversation:
        if not sid or len(sid) > 100:
            raise HTTPException(400, "a session id (1-100 characters) is required")
        if sid not in sessions:
            if len(sessions) >= max_sessions:  # forget the oldest tab
                sessions.pop(next(iter(sessions)))
            sessions[sid] = Conversation(model, tokenizer, runner, **kw)
        return sessions[sid]

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/info")
    def info() -> dict:
        cfg = model.config
        return {"title": title, "vision": has_vision, "layer_types": list(cfg.layer_types),
                "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
                "max_context": sessions_default_context(), "memory": memory_stats(model.device)}

    def sessions_default_context() -> int:
        return kw.get("max_context") or int(getattr(model.config, "max_position_embeddings", 4096))

    @app.post("/api/image")
    async def image(session: Annotated[str, Form()], file: Annotated[UploadFile, File()]) -> dict:
        conv = conversation(session)
        data = await file.read()
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                pil = im.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise HTTPException(400, f"{file.filename} could not be read as an image ({e})") from e
        try:
            tiles = conv.add_image(pil)
        except ValueError as e:
            raise HTTPException(400, str(e)) from e
        return {"tiles": tiles, "width": pil.width, "height": pil.height}

    @app.post("/api/reset")
    def reset(req: ResetRequest) -> dict:
        conversation(req.session).reset()
        return {"ok": True}

    @app.post("/api/chat")
    def chat(req: ChatRequest) -> StreamingResponse:
        conv = conversation(req.session)
        if not req.message.strip():
            raise HTTPException(400, "the message is empty")
        return StreamingResponse(_stream(conv, req.message), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _stream(conv: Conversation, message: str):
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        result: dict = {}

        def work():
            # the worker, not the response, holds the lock: a client that leaves mid-answer (its response is
            # abandoned, not closed) cannot keep the model from the next request
            with lock:
                try:
                    result["reply"] = conv.reply(message, streamer)
                except Exception as e:  # reported to the page; the conversation is unchanged
                    result["error"] = f"{type(e).__name__}: {e}"
                    streamer.end()

        t = threading.Thread(target=work, daemon=True)
        t.start()
        for text in streamer:
            if text:
                yield _sse("token", {"text": text})
        t.join()
        if "error" in result:
            yield _sse("error", {"error": result["error"]})
            return
        r = result["reply"]
        yield _sse("done", {"text": r.text, "tokens": r.new_tokens, "seconds": round(r.seconds, 3),
                            "tokens_per_s": round(r.tokens_per_s, 2), "notice": r.notice(),
                            "dropped": r.dropped_turns, "memory": memory_stats(model.device)})

    return app


def serve(app, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning")

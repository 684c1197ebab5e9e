"""A multi-turn conversation with a model: history, the model's chat template, images added at any turn, history
trimmed (oldest turns first) to the context budget. Used by `mmmamba chat` and `mmmamba serve`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..models.chat_prompt import INTERNLM2_CHAT_SYSTEM
from ..models.generate import eos_ids
from ..models.image_processing import (
    IMAGE_PLACEHOLDER,
    check_image_tokenizer,
    expand_image_tokens,
    load_image,
    tokens_per_tile,
)
from ..models.vision import vision_settings

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


@dataclass
class Turn:
    role: str  # "user" | "assistant"
    text: str
    pixel_values: torch.Tensor | None = None  # (n_tiles, 3, S, S): the image attached to this user turn


@dataclass
class Reply:
    text: str
    new_tokens: int
    seconds: float
    stopped_at_once: bool  # the first token was an end token: the model said nothing
    dropped_turns: int = 0  # oldest turns trimmed from the history to fit the context budget
    first_token: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def notice(self) -> str | None:
        """A user-facing line when the answer is empty, else None."""
        if self.stopped_at_once:
            return (f"[the model ended its answer at once: its first token was the end token {self.first_token!r}; "
                    "nothing to show. Try another prompt, /reset, or a model trained for chat]")
        if not self.text.strip():
            return f"[the model produced {self.new_tokens} tokens but no visible text]"
        return None


@dataclass
class Conversation:
    """`model` is the MMMambaForCausalLM (config, device); `runner` what generates (the model, or an
    `Engine` of it). `max_context`: tokens of prompt + answer (default: config.max_position_embeddings)."""

    model: torch.nn.Module
    tokenizer: object
    runner: object = None
    max_new_tokens: int = 256
    max_context: int | None = None
    max_tiles: int = 6
    gen_kwargs: dict = field(default_factory=dict)
    history: list[Turn] = field(default_factory=list)
    pending_image: torch.Tensor | None = None

    def __post_init__(self):
        self.runner = self.runner or self.model
        if self.max_context is None:
            self.max_context = int(getattr(self.model.config, "max_position_embeddings", 4096))
        if self.max_new_tokens >= self.max_context:
            raise ValueError(f"max_new_tokens {self.max_new_tokens} leaves no room for a prompt in the context "
                             f"budget of {self.max_context} tokens")

    # -- state ------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        self.history.clear()
        self.pending_image = None

    def add_image(self, image) -> int:
        """Attach an image (path or PIL image) to the next user message; returns its tile count. A missing or
        unreadable file, or a model without a vision front, raises ValueError / FileNotFoundError with the
        reason, and the conversation is left as it was."""
        cfg = self.model.config
        if getattr(cfg, "vision_config", None) is None:
            raise ValueError("this model has no vision front (config.vision_config is None); it cannot take images")
        check_image_tokenizer(cfg, self.tokenizer)
        v = vision_settings(cfg.vision_config)
        max_num = self.max_tiles if v.get("dynamic_image_size", True) else 1
        px = load_image(image, v["image_size"], max_num=max_num, min_num=min(v.get("min_dynamic_patch", 1), max_num),
                        use_thumbnail=v.get("use_thumbnail", True))
        self.pending_image = px
        return px.shape[0]

    # -- prompt -----------------------------------------------------------------------------------------------
    def _render(self, turns: list[Turn]) -> str:
        """The chat template over `turns` (each image as `<image>` in its user message), ready for the answer."""
        msgs = [{"role": t.role, "content": (IMAGE_PLACEHOLDER + "\n" if t.pixel_values is not None else "") + t.text}
                for t in turns]
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        if getattr(self.model.config, "template", None) == "internlm2-chat":
            text = f"<|im_start|>system\n{INTERNLM2_CHAT_SYSTEM}<|im_end|>"
            text += "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>" for m in msgs)
            return text + "<|im_start|>assistant\n"
        # no template: plain transcript
        return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in msgs) + "Assistant:"

    def _encode(self, turns: list[Turn]) -> tuple[torch.Tensor, torch.Tensor | None]:
        text = self._render(turns)
        images = [t.pixel_values for t in turns if t.pixel_values is not None]
        per_tile = tokens_per_tile(self.model.config) if images else 0
        for px in images:  # placeholders are expanded in order, each by its own tile count
            text = expand_image_tokens(text, px.shape[0], per_tile)
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        return ids, (torch.cat(images) if images else None)

    def prompt(self, turns: list[Turn]) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(input_ids (1, L), pixel_values or None, turns dropped): the oldest turns (a user message and its
        answer) are dropped until L + max_new_tokens fits max_context."""
        budget = self.max_context - self.max_new_tokens
        dropped = 0
        while True:
            ids, px = self._encode(turns)
            if ids.shape[1] <= budget:
                return ids, px, dropped
            if len(turns) <= 1:
                raise ValueError(f"the message is too long: its prompt is {ids.shape[1]} tokens but the context "
                                 f"budget leaves {budget} ({self.max_context} minus {self.max_new_tokens} for the "
                                 "answer); shorten it or raise --max-context")
            n = 2 if turns[1].role == "assistant" else 1
            turns, dropped = turns[n:], dropped + n

    def stop_ids(self) -> list[int]:
        """The model's stop tokens, plus the tokenizer's end-of-sequence and end-of-turn tokens."""
        ids = set(eos_ids(self.model, None))
        tok = self.tokenizer
        if getattr(tok, "eos_token_id", None) is not None:
            ids.add(tok.eos_token_id)
        vocab = tok.get_vocab()
        ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
        return sorted(ids)

    # -- a turn -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reply(self, text: str, streamer=None, generator: torch.Generator | None = None) -> Reply:
        """Add the user's message (and the pending image), generate the answer (streamed into `streamer`,
        transformers' protocol), add it to the history. On error the history is unchanged."""
        turn = Turn("user", text, self.pending_image)
        turns = [*self.history, turn]
        ids, px, dropped = self.prompt(turns)
        dev = self.model.device
        if px is not None:
            px = px.to(dev, self.model.dtype)
        stops = self.stop_ids()
        t0 = time.perf_counter()
        out = self.runner.generate(ids.to(dev), pixel_values=px, max_new_tokens=self.max_new_tokens,
                                   eos_token_id=stops, streamer=streamer, generator=generator, **self.gen_kwargs)
        seconds = time.perf_counter() - t0
        new = out[0, ids.shape[1]:].tolist()
        while new and new[-1] in stops:
            new.pop()
        answer = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        n_out = out.shape[1] - ids.shape[1]
        first = self.tokenizer.convert_ids_to_tokens(int(out[0, ids.shape[1]])) if n_out else ""
        self.history = [*turns[dropped:], Turn("assistant", answer)]
        self.pending_image = None
        return Reply(answer, n_out, seconds, stopped_at_once=n_out > 0 and not new, dropped_turns=dropped,
                     first_token=first)


"""Chat prompts that a model folder names in `config.template` but its tokenizer does not carry."""

from __future__ import annotations

INTERNLM2_IM_END_ID = 92542  # `<|im_end|>` in InternLM2 / InternVL tokenizers (template stop ids 2, 1163, 92543, 92542)
INTERNLM2_CHAT_SYSTEM = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)


def internlm2_chat_prompt(question: str, system_message: str = INTERNLM2_CHAT_SYSTEM) -> str:
    """InternVL's `internlm2-chat` template (MPT style; no newline after `<|im_end|>`), ready for the answer."""
    return (
        f"<|im_start|>system\n{system_message}<|im_end|>"
        f"<|im_start|>user\n{question}<|im_end|><|im_start|>assistant\n"
    )

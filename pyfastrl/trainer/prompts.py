"""Dataset prompts: a string, or a conversation in TRL's conversational format (a list of
``{"role", "content"}`` messages, rendered by the tokenizer's chat template with the generation
prompt appended, as TRL's ``GRPOTrainer`` does). For a conversational row the reward functions get
each completion as TRL passes it: ``[{"role": "assistant", "content": text}]``."""
from __future__ import annotations


def is_conversation(prompt) -> bool:
    return isinstance(prompt, list)


def check_prompt(prompt, where: str) -> None:
    """Raises ValueError naming ``where`` unless ``prompt`` is a non-empty string or a non-empty list
    of messages, each a dict with string ``"role"`` and ``"content"``."""
    if isinstance(prompt, str) and prompt:
        return
    if is_conversation(prompt) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt):
        return
    raise ValueError(f"{where} needs a non-empty 'prompt': a string, or a conversation (a non-empty list of "
                     f"{{'role': str, 'content': str}} messages), got {prompt!r:.200}")


def encode_prompt(tokenizer, prompt) -> list[int]:
    """The prompt's token ids: a string as the tokenizer splits it (no special tokens added), a
    conversation through ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``."""
    if not is_conversation(prompt):
        return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("a conversational prompt (a list of messages) is rendered with the tokenizer's chat "
                         "template, and this tokenizer has none (tokenizer.chat_template is None): set one, or "
                         "give the prompts as strings")
    rendered = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(rendered["input_ids"])


def reward_completions(prompts: list, texts: list[str]) -> list:
    """The completions as the reward functions get them (TRL's convention): the decoded text, or
    for a conversational prompt the assistant message holding it."""
    return [[{"role": "assistant", "content": text}] if is_conversation(prompt) else text
            for prompt, text in zip(prompts, texts)]


def completion_text(completion) -> str:
    """The text of a completion as ``reward_completions`` gives it (for reward functions)."""
    return completion if isinstance(completion, str) else completion[-1]["content"]

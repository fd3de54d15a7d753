"""The built-in default of ``pyfastrl train``: a tiny randomly initialised decoder, a bundled
character-level tokenizer and a synthetic task with a verifiable reward. No downloads.

The task: every prompt is one long shared instruction followed by a target letter (a-d); the reward
is the fraction of the completion's characters equal to that letter. The recipe is the usual
supervised-then-RL one: a short supervised warm-up (``warm_up``) teaches the answer's format only,
one of a-d repeated, the letter drawn at random rather than read from the prompt, so the warmed-up
model scores about 1/4; GRPO then has to learn which letter the prompt asks for (about 1 when it
always copies it). GRPO alone from the random model (reward about 1/100: 100-token vocabulary)
ends near 0.1 after the same 60 steps. The long instruction is shared by the prompt's G
completions: exactly what prefix grouping saves.

The multi-turn variant (``pyfastrl train --task multi-turn``): conversations of TURNS user turns,
each naming a letter; a conversation is TURNS consecutive rows, row k its first k turns (the earlier
ones answered correctly) as a TRL conversational prompt, rendered by the tokenizer's chat template,
which ends the prompt with the turn's letter as the letter task does. The rows of a conversation
share one micro-batch (``multi_turn_config``), and each row's prompt is a prefix of the next one's:
the prefix-tree batch stores the conversation's earlier turns once. The same recipe learns it: the
warmed-up model scores about 0.6 here (its first answer letter is the prompt's one more than half
the time, against 1/4 on the letter task), GRPO about 1 after 60 steps.
"""
from __future__ import annotations

import string

import torch

from pyfastrl.trainer.prompts import completion_text, encode_prompt

TARGET_LETTERS = "abcd"
WARM_UP_STEPS = 80  # supervised steps before GRPO in the built-in run
INSTRUCTION = (
    "You are a careful assistant. Read the instruction below and answer with one character repeated, "
    "with no spaces, no punctuation and nothing else. The character to repeat is given at the very end "
    "of this prompt, after the colon. Character:"
)
TURNS = 4  # user turns per conversation in the multi-turn task
SYSTEM_MESSAGE = ("You are a careful assistant. In every turn the user names one character; answer with that "
                  "character repeated, with no spaces, no punctuation and nothing else.")
# "role: content" lines, except that a user line runs on into the assistant's reply (an empty
# generation prompt): the turn's letter is the prompt's last token, as in the letter task, and a
# rendered conversation is a prefix of its continuation's. (With "\nassistant: " after the letter the
# tiny model stayed at reward 1/4 over the 60 steps; with one character after it, it ended at 0.39.)
CHAT_TEMPLATE = ("{% for message in messages %}"
                 "{% if message['role'] == 'assistant' %}{{ message['content'] + '\\n' }}"
                 "{% elif message['role'] == 'user' %}{{ 'user: ' + message['content'] }}"
                 "{% else %}{{ message['role'] + ': ' + message['content'] + '\\n' }}{% endif %}"
                 "{% endfor %}")
_SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]
_CHARACTERS = string.ascii_letters + string.digits + string.punctuation + " \n"


def build_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` (100 tokens: pad 0, bos 1, eos 2, unk 3, then
    letters, digits, punctuation, space and newline) with CHAT_TEMPLATE (a conversation renders as
    ``"system: S\\nuser: Character: a"``, the reply following the user's text directly);
    ``save_pretrained`` makes it loadable by ``AutoTokenizer``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(_SPECIAL + list(_CHARACTERS))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # one token per char
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>", chat_template=CHAT_TEMPLATE)


def build_model(tokenizer, seed: int = 0, dtype=torch.float32):
    """A 2-layer Llama (hidden 64, 4 query / 2 kv heads) with the tokenizer's vocabulary."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)


def build_dataset(size: int = 256, seed: int = 0) -> list[dict]:
    """Rows ``{"prompt", "letter"}``: the shared instruction and a target letter."""
    g = torch.Generator().manual_seed(seed)
    letters = torch.randint(len(TARGET_LETTERS), (size,), generator=g).tolist()
    return [{"prompt": f"{INSTRUCTION} {TARGET_LETTERS[i]}", "letter": TARGET_LETTERS[i]} for i in letters]


def build_conversations(size: int = 256, *, turns: int = TURNS, answer_length: int = 8, seed: int = 0) -> list[dict]:
    """Rows ``{"prompt": messages, "letter"}`` of the multi-turn task: ``size // turns``
    conversations, each as ``turns`` consecutive rows. Row k of a conversation holds the system
    message and its first k user turns ("Character: x"), the earlier ones followed by their correct
    answers (the letter repeated ``answer_length`` times); ``letter`` is turn k's."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for letters in torch.randint(len(TARGET_LETTERS), (size // turns, turns), generator=g).tolist():
        messages = [{"role": "system", "content": SYSTEM_MESSAGE}]
        for index in letters:
            letter = TARGET_LETTERS[index]
            messages = messages + [{"role": "user", "content": f"Character: {letter}"}]
            rows.append({"prompt": messages, "letter": letter})
            messages = messages + [{"role": "assistant", "content": letter * answer_length}]
    return rows


def letter_reward(prompts, completions, letter, **_):
    """Fraction of each completion's characters equal to its row's target letter (0 if empty)."""
    texts = [completion_text(c) for c in completions]
    return [sum(c == want for c in text) / len(text) if text else 0.0 for text, want in zip(texts, letter)]


def default_config(**overrides):
    """The built-in run's options: 60 steps of 8 prompts x 8 completions of up to 8 characters, each
    rollout used for 2 optimizer steps (so the clip ratio is live), KL to the initial (warmed-up)
    model at beta 0.04, symmetric clipping (epsilon 0.2, as TRL)."""
    from pyfastrl.trainer.config import GRPOConfig

    # seed, schedule and logging pinned: GRPOConfig's defaults are TRL's (seed 42, linear decay,
    # logging every 10 steps), and the built-in run logs every step of its constant-rate recipe.
    # Prefix trees off: the letter task's prompts share the instruction across groups too, but its
    # documented run (README: rewards, tokens, timings) is the one-level grouped one.
    options = dict(max_steps=60, learning_rate=3e-3, per_device_train_batch_size=16, gradient_accumulation_steps=4,
                   num_generations=8, num_iterations=2, max_completion_length=8, beta=0.04,
                   warmup_steps=2, seed=0, lr_scheduler_type="constant", logging_steps=1,
                   output_dir="pyfastrl-output", use_prefix_tree=False)
    return GRPOConfig(**{**options, **overrides})


def multi_turn_config(**overrides):
    """The multi-turn run (``build_conversations``): ``default_config``'s recipe and completions per
    step, with one conversation per micro-batch (its TURNS rows in dataset order, ``shuffle_dataset``
    off, TURNS x 8 completions per micro-batch) stored as a prefix tree."""
    options = dict(shuffle_dataset=False, use_prefix_tree=True, per_device_train_batch_size=TURNS * 8,
                   gradient_accumulation_steps=64 // (TURNS * 8))
    return default_config(**{**options, **overrides})


def warm_up(model, tokenizer, dataset: list, *, steps: int = WARM_UP_STEPS, batch_size: int = 16,
            learning_rate: float = 5e-3, completion_length: int = 8, seed: int = 0) -> list[float]:
    """Supervised warm-up on the task's format only (AdamW on the completion tokens' cross-entropy):
    after each prompt of ``dataset``, one letter of TARGET_LETTERS drawn at random (not the
    prompt's) repeated ``completion_length`` times (the sampling limit, so no EOS is taught). The
    model learns to answer with one target letter repeated, a reward of about 1/len(TARGET_LETTERS)
    on the letter task (about 0.6 on the multi-turn one); which letter the prompt asks for is left
    to GRPO. Deterministic given ``seed``. Returns each step's loss."""
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    letter_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(TARGET_LETTERS)))
    prompt_ids = [torch.tensor(encode_prompt(tokenizer, row["prompt"])) for row in dataset]
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    model.train()
    losses = []
    for _ in range(steps):
        rows = torch.randint(len(dataset), (batch_size,), generator=g).tolist()
        answers = letter_ids[torch.randint(len(TARGET_LETTERS), (batch_size,), generator=g)]
        completion = answers[:, None].expand(-1, completion_length)
        # Right-padded [prompt ; answer] rows (the multi-turn prompts differ in length) and no
        # attention mask: the loss is on the answers only, and in a causal model padding after a
        # row's end changes nothing before it (an LLA model also refuses right-padding masks).
        lengths = torch.tensor([prompt_ids[i].numel() for i in rows])
        input_ids = torch.nn.utils.rnn.pad_sequence([torch.cat([prompt_ids[i], c]) for i, c in zip(rows, completion)],
                                                    batch_first=True, padding_value=tokenizer.pad_token_id)
        columns = torch.arange(input_ids.shape[1])
        answer = (columns >= lengths[:, None]) & (columns < lengths[:, None] + completion_length)
        labels = input_ids.masked_fill(~answer, -100)
        loss = model(input_ids=input_ids.to(device), labels=labels.to(device)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses

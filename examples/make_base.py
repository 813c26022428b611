"""Build the example's base checkpoint (examples/base) and chat data (examples/data) from scratch.

The skill: writing numbers 0-999 in English words ("347" -> "three hundred forty-seven") and
back. The base model learns it from plain prose ("347 is written as three hundred forty-seven.")
and never sees a chat turn, so before fine-tuning it cannot answer in the chat format. The chat
data asks for the same skill as user/assistant turns; the eval split uses numbers that appear in
no training row, so a model that answers them has learned the format and drawn on pretraining.

    python examples/make_base.py                 # corpus, tokenizer, pretraining, data files
    python examples/make_base.py --data-only     # rewrite examples/data/*.jsonl only

Every step is seeded (--seed, default 0). The data files, the tokenizer and config.json come out
byte-identical on every machine; the weights only on the same CPU type with the same torch build
and thread count, because float reductions round differently on other vector units (AVX2 vs
AVX-512) and 1000 training steps amplify the last bits. The shipped examples/base came from
`python examples/make_base.py --threads 1`: 1000 steps of 16 x 64 tokens, 334 s in all on a busy
shared 2-core CPU (torch 2.13), reaching 0.91 prose-completion accuracy; running the command again
on that CPU wrote byte-identical files (207 s at a lighter load). On an AMD EPYC (Zen 4) CPU with
torch 2.13.0+cpu the same command took 152 s, reached 0.96, and wrote other weights (largest
elementwise difference 0.40), so use --out to rebuild elsewhere rather than over the shipped base
that docs/training.md's numbers are for.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

import minift
from minift.models.config import ModelConfig
from minift.models.llama import Llama
from minift.models.tokenizer import Tokenizer

HERE = Path(__file__).resolve().parent
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]  # ids 0-5
# "<s><|user|>question<|assistant|>reply</s>": a reply ends with </s>, which the base already
# emits at the end of a document; a user turn ends at the next role marker, not at </s>, because
# the base has learned that nothing before a </s> bears on what follows it.
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>"
                 "{{ message['content'] | trim }}{% if message['role'] == 'assistant' %}"
                 "{{ eos_token }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
NUMBERS = 1000
EVAL_SIZE = 100

# ---- the skill ---------------------------------------------------------------------------
ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
        "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    """0 <= n < 1000 in American English: 347 -> 'three hundred forty-seven'."""
    hundreds, rest = divmod(n, 100)
    parts = [f"{ONES[hundreds]} hundred"] if hundreds else []
    if rest or not hundreds:
        tens, ones = divmod(rest, 10)
        parts.append(ONES[rest] if rest < 20 else TENS[tens] + (f"-{ONES[ones]}" if ones else ""))
    return " ".join(parts)


# Pretraining prose: both directions, several phrasings (varied phrasing is what lets a model
# reach a fact from a new kind of question).
PROSE = [
    "{n} is written as {w}.",
    "The number {n} is spelled {w}.",
    "In words, {n} is {w}.",
    "If you write {n} in words, you get {w}.",
    "To spell out {n}, write {w}.",
    "{W} is the number {n}.",
    "The words {w} stand for {n}.",
    "When someone says {w}, they mean {n}.",
]
FILLER = [
    "Numbers can be written with digits or with words.",
    "Counting is easy once you know the words.",
    "Every number has a name.",
    "Digits are short, words are long.",
]
# Chat requests: to words, and back to digits. Replies are the bare answer.
TO_WORDS = ["Write {n} in words.", "How do you spell the number {n}?", "Spell out {n}.",
            "What is {n} in words?"]
TO_DIGITS = ["Write {w} as a number.", "What number is {w}?", "Give the digits for {w}."]


def prose_document(rng: random.Random, sentences: int = 6) -> str:
    out = []
    for _ in range(sentences):
        if rng.random() < 0.05:
            out.append(rng.choice(FILLER))
            continue
        # one number in four below 100, so the short forms ("thirty-five") are not rare
        n = rng.randrange(100) if rng.random() < 0.25 else rng.randrange(NUMBERS)
        w = number_words(n)
        out.append(rng.choice(PROSE).format(n=n, w=w, W=w[0].upper() + w[1:]))
    return " ".join(out)


def chat_row(rng: random.Random, n: int) -> dict:
    w = number_words(n)
    if rng.random() < 0.5:
        question, answer = rng.choice(TO_WORDS).format(n=n), w
    else:
        question, answer = rng.choice(TO_DIGITS).format(w=w), str(n)
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}


def make_chat_data(seed: int, train_rows: int = 800) -> tuple[list[dict], list[dict]]:
    """Train rows over 900 numbers, eval rows over the 100 numbers no train row mentions."""
    rng = random.Random(seed)
    numbers = list(range(NUMBERS))
    rng.shuffle(numbers)
    held_out, seen = numbers[:EVAL_SIZE], numbers[EVAL_SIZE:]
    train = [chat_row(rng, rng.choice(seen)) for _ in range(train_rows)]
    evals = [chat_row(rng, n) for n in sorted(held_out)]
    return train, evals


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---- tokenizer ---------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with one token per digit (digits never merge, so every number is spelled
    out digit by digit), plus the special tokens and the chat template."""
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(texts, trainer)
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    return Tokenizer(backend, special, CHAT_TEMPLATE,
                     extra_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"])


# ---- pretraining -------------------------------------------------------------------------
def token_stream(tokenizer: Tokenizer, docs: list[str]) -> torch.Tensor:
    """All documents as one id stream: <s> doc </s> <s> doc </s> ..."""
    ids = []
    for enc in tokenizer.backend.encode_batch(docs, add_special_tokens=False):
        ids += [tokenizer.bos_token_id] + enc.ids + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def pretrain(model: Llama, stream: torch.Tensor, steps: int, batch: int, seq_len: int, lr: float,
             seed: int) -> list[float]:
    """Next-token training on random windows of the stream, AdamW, warm-up + cosine decay."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup, losses, t0 = max(1, steps // 20), [], time.time()
    model.train()
    for step in range(steps):
        scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=gen)
        window = torch.stack([stream[s:s + seq_len + 1] for s in starts.tolist()])  # (B, T + 1)
        logits = model(window[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), window[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)",
                  flush=True)
    model.eval()
    return losses


def prose_accuracy(model: Llama, tokenizer: Tokenizer, numbers: list[int]) -> float:
    """Share of numbers the model completes right in prose: '<s>347 is written as' -> words."""
    prompts = [f"{n} is written as" for n in numbers]
    answers = [f" {number_words(n)}." for n in numbers]
    ids = [[tokenizer.bos_token_id] + tokenizer.encode(p) for p in prompts]
    width = max(map(len, ids))
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    out = minift.generate(model, input_ids, max_new_tokens=12, attention_mask=mask,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    texts = [tokenizer.decode(row[width:]) for row in out]
    return sum(t.startswith(a) for t, a in zip(texts, answers)) / len(numbers)


def model_config(vocab_size: int, args) -> ModelConfig:
    # Untied embeddings: the role markers never occur in the corpus, so their input embeddings
    # keep distinct random directions. Tied, they would be trained only as output rows, all
    # pushed down alike, and a chat prompt would be hard to tell apart from its reply.
    return ModelConfig(vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                       num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32,
                       num_key_value_heads=max(1, args.hidden // 64), max_position_embeddings=512,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0, torch_dtype="float32")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(HERE / "base"), help="checkpoint folder to write")
    p.add_argument("--data-dir", default=str(HERE / "data"), help="where train/eval.jsonl go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1000, help="pretraining steps")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--docs", type=int, default=20000, help="pretraining corpus documents")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is faster on a busy machine)")
    p.add_argument("--data-only", action="store_true", help="write the chat data and stop")
    args = p.parse_args(argv)

    train_rows, eval_rows = make_chat_data(args.seed)
    write_jsonl(train_rows, Path(args.data_dir) / "train.jsonl")
    write_jsonl(eval_rows, Path(args.data_dir) / "eval.jsonl")
    print(f"wrote {len(train_rows)} train and {len(eval_rows)} eval chat rows to {args.data_dir}")
    if args.data_only:
        return

    t0 = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed + 1)
    docs = [prose_document(rng) for _ in range(args.docs)]
    tokenizer = train_tokenizer(docs, args.vocab)
    stream = token_stream(tokenizer, docs)
    print(f"corpus: {len(docs)} documents, {len(stream)} tokens; vocabulary {tokenizer.vocab_size}")
    model = Llama(model_config(tokenizer.vocab_size, args))
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    pretrain(model, stream, args.steps, args.batch, args.seq_len, args.lr, args.seed)
    probe = random.Random(args.seed + 2).sample(range(NUMBERS), 100)
    print(f"prose completion accuracy on 100 numbers: {prose_accuracy(model, tokenizer, probe):.2f}")
    minift.save_model(model, args.out)
    tokenizer.save(args.out)
    print(f"saved {args.out} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()

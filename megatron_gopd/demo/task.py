"""The demo's synthetic, verifiable task: reverse a short string of letters, learnt from noisy data.

``<|user|>cabdh</s><|assistant|>`` -> ``hdbac</s>``. A correct answer is checkable exactly, and
everything runs on a CPU in seconds.

**Why noisy supervision.** In the supervised data every answer letter is replaced by a uniformly
random one with probability ``NOISE`` (0.1). A model that fits this data well puts about
``1 - NOISE * 7/8 = 0.91`` of its probability on the right letter at each position and spreads the
rest over the wrong ones: its greedy answers are right (the argmax is the clean letter), but its
samples at temperature 1 are right only when all 3-6 letters are, about ``0.91 ** 4.5 = 0.66`` of
the time. That is the setting where the paper's claims have room to show:

* the **teacher** (the same small model trained longer on that data) is good but clearly short of
  perfect at temperature 1, with near-perfect greedy answers above it;
* the **student's base** (the same model after only a few supervised steps) is well below both;
* OPD (lambda = 1) pulls the student towards the teacher's distribution, noise included; ExOPD
  (lambda > 1) targets ``pi_teacher^lambda / pi_ref^(lambda - 1)`` (the reference is the student's
  base), which is sharper than the teacher where the teacher is more confident than the base: on
  this task, on the right letters. Its optimum is above the teacher at temperature 1; whether a
  short run gets there is what the demo measures.

Teacher and student base are made here from scratch with plain supervised steps in transformers,
then saved as Hugging Face directories: the demo then goes through the same path a user's models
take (conversion, Megatron training, rollouts through the server API, weight sync). Everything is
seeded, and runs on one thread, so the models are the same on every machine run to run.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ALPHABET = "abcdefgh"
TOKENIZER_ALPHABET = ALPHABET + " "
LENGTHS = (3, 6)  # letters per string, both ends included
NOISE = 0.1  # probability that a supervised answer letter is replaced by a random letter


@dataclass(frozen=True)
class ModelSpec:
    hidden: int
    layers: int
    heads: int
    kv_heads: int


MODEL = ModelSpec(hidden=64, layers=2, heads=4, kv_heads=2)
BASE_STEPS = 80  # supervised steps of the student's base (brief: sampled accuracy ~0.3)
TEACHER_STEPS = 400  # the teacher: the same run continued to this many steps


def random_string(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(*LENGTHS)))


def noisy_answer(s: str, rng: random.Random, noise: float = NOISE) -> str:
    """``s`` reversed, each letter replaced by a uniformly random one (possibly itself) with
    probability ``noise``."""
    return "".join(c if rng.random() >= noise else rng.choice(ALPHABET) for c in s[::-1])


def write_prompts(path: Path, n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """``n`` distinct prompts not in ``exclude``, written as jsonl of ``{"prompt", "answer",
    "domain"}`` lines (the trainer's --prompt-data format; answers are clean); returns them."""
    rng = random.Random(seed)
    seen, records = set(exclude), []
    while len(records) < n:
        s = random_string(rng)
        if s in seen:
            continue
        seen.add(s)
        records.append({"prompt": s, "answer": s[::-1], "domain": "reverse"})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def make_tokenizer(path: Path):
    from megatron_gopd.testing import make_tiny_tokenizer

    return make_tiny_tokenizer(path, alphabet=TOKENIZER_ALPHABET)


def _prompt_ids(tok, s: str) -> list[int]:
    ids = tok.apply_chat_template(
        [{"role": "user", "content": s}], add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def make_model(tok, spec: ModelSpec, seed: int):
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=spec.hidden,
        intermediate_size=2 * spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.hidden // spec.heads,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


class SupervisedRun:
    """Plain next-token SFT on the response tokens of noisy examples, resumable in stages: the
    student's base is this run after ``BASE_STEPS``, the teacher the same run continued."""

    def __init__(self, model, tok, *, seed: int, batch_size: int = 64, lr: float = 3e-3):
        self.model, self.tok, self.batch_size = model, tok, batch_size
        self.rng = random.Random(seed)
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr)
        self.steps = 0
        self.loss = float("nan")

    def train_to(self, steps: int) -> float:
        """Train until ``steps`` steps in all; returns the last batch's loss."""
        eos = self.tok.eos_token_id
        self.model.train()
        while self.steps < steps:
            batch = []
            for _ in range(self.batch_size):
                s = random_string(self.rng)
                ans = noisy_answer(s, self.rng)
                batch.append(
                    (
                        _prompt_ids(self.tok, s),
                        self.tok(ans, add_special_tokens=False)["input_ids"] + [eos],
                    )
                )
            T = max(len(p) + len(r) for p, r in batch)
            x_BT = torch.zeros(self.batch_size, T, dtype=torch.long)
            y_BT = torch.full((self.batch_size, T), -100)
            for i, (p, r) in enumerate(batch):
                x_BT[i, : len(p) + len(r)] = torch.tensor(p + r)
                y_BT[i, len(p) : len(p) + len(r)] = torch.tensor(r)
            loss = self.model(input_ids=x_BT, labels=y_BT).loss  # transformers shifts the labels
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            self.steps += 1
            self.loss = loss.item()
        return self.loss


@dataclass(frozen=True)
class Accuracy:
    """Per-prompt fractions of correct responses and the mean response length (tokens)."""

    per_prompt: list[float]
    response_len: float

    @property
    def mean(self) -> float:
        return sum(self.per_prompt) / len(self.per_prompt)

    @property
    def half_width(self) -> float:
        """Half-width of a normal 95% interval for the mean over prompts: the evaluation's own
        sampling noise (prompts are the independent units; a prompt's samples are not)."""
        n = len(self.per_prompt)
        if n < 2:
            return float("nan")
        m = self.mean
        var = sum((x - m) ** 2 for x in self.per_prompt) / (n - 1)
        return 1.96 * (var / n) ** 0.5


@torch.no_grad()
def accuracy(
    model, tok, prompts: list[dict], *, n_samples: int, temperature: float, seed: int
) -> Accuracy:
    """avg@n of exact-match accuracy (the paper's evaluation: sample at ``temperature``, average
    over samples and prompts); ``temperature == 0`` is greedy (then ``n_samples`` should be 1).
    Prompts of one length are generated together (no padding), in a fixed order, from one seeded
    generator: the same numbers on every run."""
    model.eval()
    torch.manual_seed(seed)
    eos = tok.eos_token_id
    by_len: dict[int, list[int]] = {}
    ids = [_prompt_ids(tok, rec["prompt"]) for rec in prompts]
    for i, p in enumerate(ids):
        by_len.setdefault(len(p), []).append(i)
    per_prompt = [0.0] * len(prompts)
    length = 0
    for plen in sorted(by_len):
        idx = by_len[plen]
        x_BT = torch.tensor([ids[i] for i in idx]).repeat_interleave(n_samples, dim=0)
        out = model.generate(
            x_BT,
            max_new_tokens=LENGTHS[1] + 4,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_k=None,
            top_p=None,
            eos_token_id=eos,
            pad_token_id=tok.pad_token_id,
        )
        for row_i, row in enumerate(out[:, plen:].tolist()):
            if eos in row:
                row = row[: row.index(eos) + 1]
            i = idx[row_i // n_samples]
            text = tok.decode(row, skip_special_tokens=True)
            per_prompt[i] += (text == prompts[i]["answer"]) / n_samples
            length += len(row)
    return Accuracy(per_prompt=per_prompt, response_len=length / (len(prompts) * n_samples))


def describe() -> dict:
    """The task's constants, for the results file."""
    return {
        "task": "reverse a string",
        "alphabet": ALPHABET,
        "lengths": list(LENGTHS),
        "supervised_noise": NOISE,
        "model": asdict(MODEL),
        "base_steps": BASE_STEPS,
        "teacher_steps": TEACHER_STEPS,
    }

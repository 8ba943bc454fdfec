"""The synthetic language of the transfer experiment: templated facts about generated people,
filler sentences from a small grammar, a word-level tokenizer trained on them, and the task,
a question-and-answer format that the pre-training text never uses.

Everything is generated from seeds, in canonical token ids; each model reads it through its own
tokenizer (some models number the same words differently, so that modelforge has to match
tokens by string).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

CITIES = "rome oslo lima kyiv cairo delhi quito tunis hanoi riga".split()
JOBS = "baker doctor farmer pilot singer tailor nurse miner judge clerk".split()
COLOURS = "red blue green yellow purple orange white black".split()
PETS = "cat horse parrot rabbit goat turtle hamster lizard".split()
FOODS = "rice bread soup fish beans cheese apples noodles".split()
NOUNS = "dog river house tree teacher child window road book garden market boat".split()
ADJS = "big small old new quiet busy bright dark warm cold".split()
VERBS = "sees finds follows builds paints opens carries watches".split()
ATTRIBUTES = {"city": CITIES, "job": JOBS, "colour": COLOURS, "pet": PETS, "food": FOODS}

# Statements of one fact, as pre-training sees them.
FACTS = {
    "city": ["{n} lives in {v} .", "in {v} , {n} has a small house ."],
    "job": ["{n} works as a {v} .", "everyone knows that {n} is a {v} ."],
    "colour": ["the favourite colour of {n} is {v} .", "{n} wears {v} ."],
    "pet": ["{n} keeps a {v} at home .", "the {v} of {n} is old ."],
    "food": ["{n} eats {v} every day .", "for dinner {n} has {v} ."],
}
# The task: a question-and-answer format over the same facts, never seen in pre-training.
QUESTIONS = {
    "city": "question : where does {n} live ? answer : {v} .",
    "job": "question : what job does {n} do ? answer : {v} .",
    "colour": "question : which colour does {n} like ? answer : {v} .",
    "pet": "question : which pet does {n} keep ? answer : {v} .",
    "food": "question : what food does {n} eat ? answer : {v} .",
}
# Filler from a small grammar; it also uses every word of the questions, in other roles, so that
# the task's words have trained embeddings.
FILLER = [
    "the {a} {o} {b} the {a2} {o2} .",
    "where is the {o} ? the {o} is near the {o2} .",
    "what does the {o} do ? the {o} {b} the {o2} .",
    "which {o} is {a} ? the {a} one .",
    "a question for the teacher : is the {o} {a} ?",
    "the answer is the {a} {o} .",
    "people do not live in the {o} .",
    "every {j} does a good job .",
    "the children like the {a} {o} .",
    "a {p} is a good pet .",
    "we keep the {o} in the {o2} .",
    "{f} is good food .",
    "the children eat {f} .",
    "the {o} has the colour {c} .",
]

SPECIALS = ["<unk>", "<pad>"]


def syllable_names(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    onsets, vowels, codas = "b d f g k l m n p r s t v z".split(), "a e i o u".split(), ["", "n", "r", "s", "l"]
    names: set[str] = set()
    while len(names) < count:
        names.add("".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(2)))
    return sorted(names)


@dataclass
class World:
    """The people and their facts, and the split of people into the task's train and eval sets."""
    people: int
    seed: int = 0
    names: list[str] = field(init=False)
    facts: dict[str, dict[str, str]] = field(init=False)

    def __post_init__(self):
        self.names = syllable_names(self.people, self.seed)
        rng = random.Random(self.seed + 1)
        self.facts = {n: {k: rng.choice(v) for k, v in ATTRIBUTES.items()} for n in self.names}
        split = (2 * self.people) // 3
        self.task_train, self.task_eval = self.names[:split], self.names[split:]

    def words(self) -> list[str]:
        seen: dict[str, None] = {}
        for text in (*FACTS.values(), QUESTIONS.values(), FILLER):
            for t in (text if isinstance(text, list) else list(text)):
                for w in t.split():
                    if "{" not in w:
                        seen.setdefault(w, None)
        for group in (CITIES, JOBS, COLOURS, PETS, FOODS, NOUNS, ADJS, VERBS, self.names):
            for w in group:
                seen.setdefault(w, None)
        return list(seen)

    def pretraining_sentence(self, rng: random.Random) -> str:
        if rng.random() < 0.55:
            name = rng.choice(self.names)
            kind = rng.choice(list(FACTS))
            return rng.choice(FACTS[kind]).format(n=name, v=self.facts[name][kind])
        return rng.choice(FILLER).format(
            a=rng.choice(ADJS), a2=rng.choice(ADJS), o=rng.choice(NOUNS), o2=rng.choice(NOUNS),
            b=rng.choice(VERBS), j=rng.choice(JOBS), p=rng.choice(PETS), f=rng.choice(FOODS),
            c=rng.choice(COLOURS))

    def task_sentence(self, rng: random.Random, people: list[str]) -> str:
        name = rng.choice(people)
        kind = rng.choice(list(QUESTIONS))
        return QUESTIONS[kind].format(n=name, v=self.facts[name][kind])


class Vocab:
    """The canonical word-level vocabulary, trained with the `tokenizers` library on the corpus."""

    def __init__(self, world: World, sample: list[str]):
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        trainer = trainers.WordLevelTrainer(special_tokens=SPECIALS, min_frequency=1)
        tok.train_from_iterator(sample + [" ".join(world.words())], trainer=trainer)
        vocab = tok.get_vocab()
        self.words = [w for w, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        self.index = {w: i for i, w in enumerate(self.words)}
        missing = [w for w in world.words() if w not in self.index]
        assert not missing, missing

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        return [self.index[w] for w in text.split()]

    def permutation(self, seed: int | None) -> torch.Tensor:
        """canonical id -> this model's id: the identity, or a shuffle that keeps the specials."""
        if seed is None:
            return torch.arange(len(self))
        g = torch.Generator().manual_seed(seed)
        rest = torch.randperm(len(self) - len(SPECIALS), generator=g) + len(SPECIALS)
        return torch.cat([torch.arange(len(SPECIALS)), rest])

    def save_tokenizer(self, directory: Path, permutation: torch.Tensor) -> None:
        """tokenizer.json for a model whose ids are `permutation` of the canonical ones."""
        from tokenizers import Tokenizer, models, pre_tokenizers
        vocab = {w: int(permutation[i]) for i, w in enumerate(self.words)}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "pad_token": "<pad>"}))


def stream(vocab: Vocab, sentence, rng: random.Random, tokens: int) -> torch.Tensor:
    """Sentences joined into one run of `tokens` canonical ids."""
    ids: list[int] = []
    while len(ids) < tokens:
        ids += vocab.encode(sentence(rng))
    return torch.tensor(ids[:tokens])


def batches(vocab: Vocab, sentence, seed: int, count: int, size: int, length: int) -> torch.Tensor:
    """`count` batches of `size` windows of `length` tokens, [count, size, length]."""
    rng = random.Random(seed)
    return stream(vocab, sentence, rng, count * size * length).view(count, size, length)


@dataclass
class Data:
    """Every token set the experiment uses, in canonical ids."""
    vocab: Vocab
    world: World
    length: int

    def pretraining(self, seed: int, count: int, size: int) -> torch.Tensor:
        return batches(self.vocab, self.world.pretraining_sentence, seed, count, size, self.length)

    def task(self, seed: int, count: int, size: int, held_out: bool) -> torch.Tensor:
        people = self.world.task_eval if held_out else self.world.task_train
        return batches(self.vocab, lambda r: self.world.task_sentence(r, people), seed, count, size, self.length)


def make_data(people: int, length: int) -> Data:
    world = World(people)
    rng = random.Random(123)
    sample = [world.pretraining_sentence(rng) for _ in range(2000)]
    return Data(Vocab(world, sample), world, length)

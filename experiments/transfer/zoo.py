"""The models of the transfer experiment: small bases of four families trained from scratch on the
synthetic corpus, two controls made from one of them (the same model re-laid into Phi-3's fused
layout, and the same model with its RMSNorm gains folded and its residual stream rotated), and a
LoRA for the task on each. Everything trained is cached under a key of its settings."""
from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig,
                          GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM)

from world import Data

# Bump when training or model-making code changes in a way the settings do not show.
MODEL_VERSION = 1
LORA_VERSION = 2

LORA_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


@dataclass(frozen=True)
class Spec:
    name: str
    family: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    seed: int
    steps: int
    # None: the canonical token ids; else the seed of this model's own numbering of the words.
    renumber: int | None = None
    # A control made from another model rather than trained: "relaid" or "rotated".
    control: str | None = None
    parent: str | None = None
    # The learning rate of a derived model's further training (`steps` of it).
    lr: float = 0.0
    head_dim: int | None = None


@dataclass(frozen=True)
class Training:
    batch: int
    lr: float
    lora_rank: int
    lora_steps: int
    lora_lr: float


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def config(spec: Spec, vocab: int, length: int):
    common = dict(vocab_size=vocab, bos_token_id=None, eos_token_id=None, pad_token_id=1)
    if spec.family == "llama":
        return LlamaConfig(hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                           num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                           num_key_value_heads=spec.heads, head_dim=spec.head_dim or spec.hidden // spec.heads,
                           max_position_embeddings=length, rms_norm_eps=1e-6, tie_word_embeddings=False,
                           initializer_range=0.05, **common)
    if spec.family == "phi3":
        return Phi3Config(hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                          num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                          num_key_value_heads=spec.heads, max_position_embeddings=length,
                          original_max_position_embeddings=length, rms_norm_eps=1e-6,
                          tie_word_embeddings=False, initializer_range=0.05, **common)
    if spec.family == "gpt_neox":
        return GPTNeoXConfig(hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                             num_hidden_layers=spec.layers, num_attention_heads=spec.heads, rotary_pct=1.0,
                             max_position_embeddings=length, tie_word_embeddings=False,
                             initializer_range=0.05, **common)
    if spec.family == "gpt2":
        return GPT2Config(n_embd=spec.hidden, n_inner=spec.intermediate, n_layer=spec.layers, n_head=spec.heads,
                          n_positions=length, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                          initializer_range=0.05, **common)
    raise ValueError(spec.family)


def schedule(step: int, steps: int, warmup: int = 50) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train(model: torch.nn.Module, params, batches: torch.Tensor, lr: float, log: list) -> None:
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, len(batches)))
    model.train()
    for step, ids in enumerate(batches):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == len(batches) - 1:
            log.append((step, round(loss.item(), 4)))
    model.eval()


class Zoo:
    """Trained and derived models, cached under `cache/models/NAME-KEY/`."""

    def __init__(self, cache: Path, data: Data, training: Training, say=print):
        self.cache, self.data, self.training, self.say = cache, data, training, say
        self.specs: dict[str, Spec] = {}
        self.dirs: dict[str, Path] = {}
        self.keys: dict[str, str] = {}
        self.trained_now: list[str] = []

    def permutation(self, name: str) -> torch.Tensor:
        spec = self.specs[name]
        while spec.control:  # controls number words as their parent does
            spec = self.specs[spec.parent]
        return self.data.vocab.permutation(spec.renumber)

    def _cached(self, kind: str, name: str, key: str, make) -> Path:
        final = self.cache / kind / f"{name}-{key}"
        if not (final / "done").exists():
            tmp = self.cache / kind / f".{name}-{key}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            make(tmp)
            (tmp / "done").write_text("")
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            self.trained_now.append(f"{kind}/{name}")
        return final

    def add(self, spec: Spec) -> Path:
        self.specs[spec.name] = spec
        data_key = (self.data.world.people, self.data.length, len(self.data.vocab))
        parent_key = self.keys.get(spec.parent) if spec.parent else None
        key = digest(MODEL_VERSION, asdict(spec), self.training.batch, self.training.lr, data_key, parent_key)
        self.keys[spec.name] = key
        make = (lambda d: self._control(spec, d)) if spec.control else (lambda d: self._train(spec, d))
        self.dirs[spec.name] = self._cached("models", spec.name, key, make)
        return self.dirs[spec.name]

    def _train(self, spec: Spec, out: Path) -> None:
        self.say(f"  training {spec.name} ({spec.family}, {spec.hidden} wide, {spec.layers} layers, {spec.steps} steps)")
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config(spec, len(self.data.vocab), self.data.length))
        perm = self.data.vocab.permutation(spec.renumber)
        # The same corpus, in the same order, for every base: only the initialisation differs.
        batches = perm[self.data.pretraining(seed=1000, count=spec.steps, size=self.training.batch)]
        log: list = []
        train(model, list(model.parameters()), batches, self.training.lr, log)
        model.save_pretrained(out)
        self.data.vocab.save_tokenizer(out, perm)
        (out / "training.json").write_text(json.dumps({"spec": asdict(spec), "loss": log}))

    def _control(self, spec: Spec, out: Path) -> None:
        """A model made from its parent: re-laid or rotated (the same function, not trained), or
        trained further (`tuned`), sliced to a narrower residual stream (`sliced`) or cut to fewer
        layers (`dropped`), then healed by training on the corpus."""
        parent = self.dirs[spec.parent]
        source = LlamaForCausalLM.from_pretrained(parent).eval()
        state = {k: v.detach().clone() for k, v in source.state_dict().items()}
        vocab, length = len(self.data.vocab), self.data.length
        if spec.control == "relaid":
            model = Phi3ForCausalLM(config(replace(spec, family="phi3"), vocab, length))
            model.load_state_dict(to_phi3(state))
        elif spec.control == "rotated":
            model = LlamaForCausalLM(source.config)
            model.load_state_dict(rotated(folded(state), orthogonal(spec.hidden, spec.seed)))
        elif spec.control == "tuned":
            model = source
        elif spec.control == "sliced":  # SliceGPT: the principal directions of the residual stream
            ids = self.permutation(spec.parent)[self.data.pretraining(seed=6, count=1, size=64)[0]]
            with torch.no_grad():
                hidden = torch.cat([h.reshape(-1, h.shape[-1]) for h in source(
                    input_ids=ids, output_hidden_states=True).hidden_states[:-1]])
            q = torch.linalg.eigh(hidden.T @ hidden)[1].flip(1).T[: spec.hidden]
            model = LlamaForCausalLM(config(spec, vocab, length))
            model.load_state_dict(rotated(folded(state), q))
        elif spec.control == "dropped":  # the middle layers go, the first and last stay
            parent_layers = source.config.num_hidden_layers
            keep = [0] + list(range(parent_layers - spec.layers + 1, parent_layers))
            model = LlamaForCausalLM(config(spec, vocab, length))
            moved = {}
            for name, t in state.items():
                m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
                if m is None:
                    moved[name] = t
                elif int(m.group(1)) in keep:
                    moved[f"model.layers.{keep.index(int(m.group(1)))}.{m.group(2)}"] = t
            model.load_state_dict(moved)
        else:
            raise ValueError(spec.control)
        record: dict = {"spec": asdict(spec)}
        if spec.steps:
            self.say(f"  training {spec.name} ({spec.control} from {spec.parent}, {spec.steps} steps)")
            batches = self.permutation(spec.parent)[self.data.pretraining(
                seed=1100 + spec.seed, count=spec.steps, size=self.training.batch)]
            log: list = []
            train(model, list(model.parameters()), batches, spec.lr, log)
            record["loss"] = log
        else:
            model.eval()
            ids = self.data.pretraining(seed=5, count=1, size=4)[0]
            with torch.no_grad():
                gap = (model(input_ids=ids).logits - source(input_ids=ids).logits).abs().max().item()
            assert gap < 1e-3, f"{spec.name} is not the same function as {spec.parent}: {gap}"
            record["max_logit_gap"] = gap
        model.save_pretrained(out)
        self.data.vocab.save_tokenizer(out, self.permutation(spec.parent))
        (out / "training.json").write_text(json.dumps(record))

    def lora(self, name: str) -> Path:
        """The task's LoRA on model `name` (for a source, what is carried; for a target, the ceiling)."""
        t = self.training
        key = digest(LORA_VERSION, self.keys[name], t.lora_rank, t.lora_steps, t.lora_lr, t.batch)
        return self._cached("loras", name, key, lambda d: self._train_lora(name, d))

    def _train_lora(self, name: str, out: Path) -> None:
        from peft import LoraConfig, get_peft_model
        spec, t = self.specs[name], self.training
        self.say(f"  training the task LoRA on {name}")
        family = "phi3" if spec.control == "relaid" else spec.family
        model = AutoModelForCausalLM.from_pretrained(self.dirs[name])
        torch.manual_seed(7)
        peft = get_peft_model(model, LoraConfig(r=t.lora_rank, lora_alpha=2 * t.lora_rank, lora_dropout=0.0,
                                                target_modules=LORA_TARGETS[family],
                                                fan_in_fan_out=family == "gpt2"))
        # Half of each batch is the task, half plain corpus text (replay), so that the adapter
        # learns the task without forgetting the corpus.
        half = t.batch // 2
        batches = self.permutation(name)[torch.cat([
            self.data.task(seed=2000, count=t.lora_steps, size=half, held_out=False),
            self.data.pretraining(seed=2001, count=t.lora_steps, size=t.batch - half)], dim=1)]
        log: list = []
        train(peft, [p for p in peft.parameters() if p.requires_grad], batches, t.lora_lr, log)
        peft.save_pretrained(out)
        (out / "training.json").write_text(json.dumps({"loss": log}))


def orthogonal(n: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed)))[0]


def to_phi3(llama: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in llama.items():
        if ".self_attn.q_proj." in name:
            out[name.replace("q_proj", "qkv_proj")] = torch.cat(
                [t, llama[name.replace("q_proj", "k_proj")], llama[name.replace("q_proj", "v_proj")]])
        elif ".mlp.gate_proj." in name:
            out[name.replace("gate_proj", "gate_up_proj")] = torch.cat([t, llama[name.replace("gate_proj", "up_proj")]])
        elif not any(k in name for k in (".k_proj.", ".v_proj.", ".up_proj.")):
            out[name] = t
    return out


def folded(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same LLaMA with every RMSNorm gain moved into the linear layers that read it."""
    out = dict(state)
    following = {"input_layernorm": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                 "post_attention_layernorm": ["mlp.gate_proj", "mlp.up_proj"]}
    for name, gain in state.items():
        if "norm" not in name:
            continue
        out[name] = torch.ones_like(gain)
        if name == "model.norm.weight":
            targets = ["lm_head.weight"]
        else:
            prefix, kind = name.rsplit(".", 2)[0], name.split(".")[-2]
            targets = [f"{prefix}.{m}.weight" for m in following[kind]]
        for t in targets:
            out[t] = out[t] * gain
    return out


def rotated(state: dict[str, torch.Tensor], q: torch.Tensor) -> dict[str, torch.Tensor]:
    """The residual stream rotated by q: E Qᵀ, W_in Qᵀ, Q W_out (norm gains must be 1)."""
    out = {}
    for name, t in state.items():
        if "norm" in name:
            assert torch.all(t == 1), "fold the norm gains first"
            out[name] = torch.ones(q.shape[0])
        elif any(m in name for m in ("o_proj", "down_proj")):
            out[name] = q @ t
        else:
            out[name] = t @ q.T
    return out

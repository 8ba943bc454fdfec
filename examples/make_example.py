#!/usr/bin/env python3
"""Makes modelforge's shipped example (deterministic; re-running rewrites the same files):

    examples/tiny-llama/        a tiny LLaMA (GQA, 2 layers, hidden 64, vocab 256, f32) with a
                                word-level tokenizer; random weights, made from a config in code
    examples/tiny-llama-lora/   a LoRA adapter (r=8, alpha=16, all seven projections) trained with
                                PEFT for 150 steps to continue the sequence w[i+1] = w[(5i + 3) mod 256]

and prints recipes/quickstart.toml (or writes it with --recipe PATH).  All files together are
about 0.5 MB.

    .venv/bin/python examples/make_example.py [--recipe recipes/quickstart.toml]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)  # also keeps float reductions, hence the files, identical from run to run

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

HERE = Path(__file__).resolve().parent
VOCAB = 256
MUL, ADD = 5, 3
SEED = 1234

QUICKSTART = """\
# Fuse the example LoRA adapter into the example tiny LLaMA.
#   modelforge build recipes/quickstart.toml
# Paths are relative to this file.

[base]
path = "../examples/tiny-llama"

[[adapter]]
path = "../examples/tiny-llama-lora"
weight = 1.0

[output]
path = "../build/quickstart"
dtype = "base"

[build]
device = "cpu"
"""


def make_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def stable_adapter_config(path: Path) -> None:
    """PEFT writes target_modules from a set, in hash order (it changes with PYTHONHASHSEED): sort it."""
    cfg = json.loads(path.read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def batch(g: torch.Generator, n: int = 16, seq: int = 32) -> torch.Tensor:
    cols = [torch.randint(3, VOCAB, (n, 1), generator=g)]
    for _ in range(seq - 1):
        cols.append((cols[-1] * MUL + ADD) % VOCAB)
    return torch.cat(cols, dim=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE), help="folder to write tiny-llama/ and tiny-llama-lora/ into")
    ap.add_argument("--recipe", help="also write the quickstart recipe to this path")
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args(argv)
    out = Path(args.out)
    base_dir, lora_dir = out / "tiny-llama", out / "tiny-llama-lora"

    torch.manual_seed(SEED)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    for d in (base_dir, lora_dir):
        if d.exists():
            shutil.rmtree(d)
    model.save_pretrained(str(base_dir))
    make_tokenizer().save_pretrained(str(base_dir))

    lcfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    pm = get_peft_model(model, lcfg)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(SEED + 1)
    held_out = batch(torch.Generator().manual_seed(SEED + 2))
    with torch.no_grad(), pm.disable_adapter():
        loss_base = pm(input_ids=held_out, labels=held_out).loss.item()
    pm.train()
    for _ in range(args.steps):
        ids = batch(g)
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    pm.eval()
    with torch.no_grad():
        loss_lora = pm(input_ids=held_out, labels=held_out).loss.item()
    pm.save_pretrained(str(lora_dir))
    (lora_dir / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
    stable_adapter_config(lora_dir / "adapter_config.json")

    size = sum(p.stat().st_size for d in (base_dir, lora_dir) for p in d.iterdir())
    print(f"wrote {base_dir} and {lora_dir} ({size / 1e6:.2f} MB)", file=sys.stderr)
    print(f"held-out loss: base {loss_base:.3f}, with adapter {loss_lora:.3f}", file=sys.stderr)
    if args.recipe:
        Path(args.recipe).parent.mkdir(parents=True, exist_ok=True)
        Path(args.recipe).write_text(QUICKSTART)
        print(f"wrote {args.recipe}", file=sys.stderr)
    else:
        print("---- recipes/quickstart.toml ----", file=sys.stderr)
        print(QUICKSTART, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

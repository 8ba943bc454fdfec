"""llama.cpp itself loads modelforge's GGUF and runs it: node-llama-cpp (npm, prebuilt llama.cpp
binaries, installed by scripts/test.sh into target/node) continues a prompt greedily, and its
tokenization, its tokens and each step's five likeliest tokens must be transformers' on the same
fused model's directory, with probabilities within 0.5% (llama.cpp's kernels sum in another
order; a GGUF without the q/k permutation gives other tokens from the first step). Tied and untied, LLaMA (whose q/k rows the
GGUF permutes) and Qwen2 (q/k/v biases, no permutation), with a byte-level BPE tokenizer and,
for LLaMA, a SentencePiece one (`tokenizer.model`, written as llama.cpp's `llama` vocabulary);
weights scaled up so that attention is peaked and a wrong permutation would show.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from peft import LoraConfig, get_peft_model  # noqa: E402
from support import REPO, modelforge  # noqa: E402
from test_gguf import bpe_tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

NODE = Path(os.environ.get("MODELFORGE_NODE_DIR", REPO / "target" / "node"))
PROMPT = "the cat sat on"
STEPS = 6


def model(kind: str, tie: bool, vocab: int):
    torch.manual_seed(11)
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=tie, bos_token_id=0,
                  eos_token_id=1, max_position_embeddings=128, initializer_range=0.25)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    return Qwen2ForCausalLM(Qwen2Config(**common))


def sentencepiece_tokenizer(dest: Path):
    """A SentencePiece BPE model with byte fallback, as LLaMA 2's, trained here; the directory
    holds tokenizer.model beside the tokenizer.json transformers converts it to."""
    import io

    import sentencepiece as spm
    from test_gguf import CORPUS
    from transformers import LlamaTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=320,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    dest.mkdir(parents=True)
    (dest / "tokenizer.model").write_bytes(model.getvalue())
    return LlamaTokenizer.from_pretrained(dest)


def llama_cpp(gguf: Path) -> dict:
    if not (NODE / "node_modules" / "node-llama-cpp").is_dir():
        pytest.fail(f"node-llama-cpp is not installed in {NODE}: run scripts/test.sh, which installs it")
    script = NODE / "llama_cpp_eval.mjs"
    shutil.copy(Path(__file__).with_name("llama_cpp_eval.mjs"), script)
    run = subprocess.run(["node", str(script), str(gguf), PROMPT, str(STEPS)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind,tie,vocab", [("llama", False, "bpe"), ("llama", True, "bpe"), ("qwen2", True, "bpe"),
                                            ("llama", False, "sentencepiece")])
def test_llama_cpp_runs_the_gguf_as_transformers_runs_the_model(tmp_path, kind, tie, vocab):
    base = tmp_path / "base"
    tok = bpe_tokenizer() if vocab == "bpe" else sentencepiece_tokenizer(base)
    model(kind, tie, len(tok)).save_pretrained(base)
    tok.save_pretrained(base)
    peft = get_peft_model(model(kind, tie, len(tok)),
                          LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.mul_(20)
    peft.save_pretrained(tmp_path / "lora")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[base]\npath = "base"\n[[adapter]]\npath = "lora"\n'
                      '[output]\npath = "out"\ngguf = "out.gguf"\ngguf_type = "f32"\n')
    modelforge("build", recipe, "--quiet")

    ours = llama_cpp(tmp_path / "out.gguf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert ours["prompt"] == tok.encode(PROMPT, add_special_tokens=False), "llama.cpp tokenizes as transformers"
    ids = torch.tensor([ours["prompt"]])
    with torch.no_grad():
        for step in ours["steps"]:
            probs = hf(ids).logits[0, -1].softmax(-1)
            top = probs.topk(5)
            assert step["token"] == int(top.indices[0]), "the same greedy token"
            assert [t for t, _ in step["top"]] == top.indices.tolist()
            for (t, p), q in zip(step["top"], top.values.tolist()):
                assert abs(p - q) <= 5e-3 * q + 1e-7, (t, p, q)
            ids = torch.cat([ids, torch.tensor([[step["token"]]])], 1)
    # The steps are informative: attention is peaked enough that probabilities are far from uniform.
    assert max(p for _, p in ours["steps"][0]["top"]) > 2.0 / len(tok)

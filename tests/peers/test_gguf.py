"""`[output] gguf`: the fused model as llama.cpp's GGUF, read back with the `gguf` package.

Known answers: llama.cpp's converter (convert_hf_to_gguf.py) renames the tensors, lists their
dimensions innermost first, permutes LLaMA's q/k rows (`permute` below, copied from it), keeps
1-D tensors in f32 and converts the rest with gguf-py's own quantizers; so every tensor of the GGUF
must equal gguf-py's conversion of the HF output's tensor, bit for bit, for each `gguf_type`. The
metadata must carry the config's hyper-parameters and the tokenizer (tokens, types, merges, special
ids, chat template). The GGUF is an output like the others: in the lock, reproducible, verified,
and rebuilt without recomputing anything when only `gguf_type` changes. llama.cpp itself loads
it in test_llama_cpp.py.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

import gguf  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from support import modelforge  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
         "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
CORPUS = ["the cat sat on the mat", "a dog ran to the park", "the bird sang a song on the tree",
          "<|user|> hello <|assistant|> hi there"] * 40


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer trained here, as GPT-2's and LLaMA 3's are."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.add_tokens(["<|user|>", "<|assistant|>"])
    fast.chat_template = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    return fast


def tiny(kind: str, tie: bool, vocab: int):
    torch.manual_seed(7)
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=tie, bos_token_id=0,
                  eos_token_id=1, max_position_embeddings=256, rms_norm_eps=1e-5)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(rope_theta=50000.0, **common))
    return Qwen2ForCausalLM(Qwen2Config(**common))


def permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def gguf_name(hf: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{NAMES[module]}.{kind}"


def expected(kind: str, hf: dict[str, torch.Tensor], gguf_type: str) -> dict[str, np.ndarray]:
    """What convert_hf_to_gguf.py writes for each tensor: renamed, permuted, converted."""
    out = {}
    for name, t in hf.items():
        data = t.to(torch.float32).numpy()
        if kind == "llama" and name.endswith("q_proj.weight"):
            data = permute(data, 4)
        elif kind == "llama" and name.endswith("k_proj.weight"):
            data = permute(data, 2)
        qtype = TYPES["f32"] if data.ndim == 1 else TYPES[gguf_type]
        if qtype == TYPES["q8_0"] and data.shape[-1] % 32:
            qtype = TYPES["f16"]  # the converter's fallback
        out[gguf_name(name)] = (qtype, gguf.quants.quantize(data, qtype))
    return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("gguf")
    tok = bpe_tokenizer()
    for kind, tie in [("llama", False), ("llama", True), ("qwen2", True)]:
        base = ws / f"{kind}-{'tied' if tie else 'untied'}"
        model = tiny(kind, tie, len(tok))
        model.save_pretrained(base)
        tok.save_pretrained(base)
        peft = get_peft_model(tiny(kind, tie, len(tok)),
                              LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                         target_modules=["q_proj", "k_proj", "v_proj", "down_proj"]))
        peft.save_pretrained(ws / f"{base.name}-lora")
    return ws


def build(ws: Path, base: str, gguf_type: str, name: str, path: bool = True, check: bool = True):
    recipe = ws / f"{name}.toml"
    lines = [f'[base]\npath = "{base}"', f'[[adapter]]\npath = "{base}-lora"', "[output]"]
    if path:
        lines.append(f'path = "{name}-out"')
    lines += [f'gguf = "{name}.gguf"', f'gguf_type = "{gguf_type}"']
    recipe.write_text("\n".join(lines) + "\n")
    return recipe, modelforge("build", recipe, "--json", check=check)


@pytest.mark.parametrize("base", ["llama-untied", "llama-tied", "qwen2-tied"])
@pytest.mark.parametrize("gguf_type", ["f32", "f16", "bf16", "q8_0"])
def test_tensors_are_the_converters(workspace, base, gguf_type):
    name = f"{base}-{gguf_type}"
    build(workspace, base, gguf_type, name)
    hf = load_file(workspace / f"{name}-out" / "model.safetensors")
    want = expected(base.split("-")[0], hf, gguf_type)
    shapes = {gguf_name(k): list(v.shape) for k, v in hf.items()}
    reader = gguf.GGUFReader(workspace / f"{name}.gguf")
    got = {t.name: t for t in reader.tensors}
    assert set(got) == set(want), "tied models have no output.weight"
    assert ("output.weight" in got) == (base == "llama-untied")
    for tname, (qtype, data) in want.items():
        t = got[tname]
        assert t.tensor_type == qtype, tname
        assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1), data.view(np.uint8).reshape(-1)), tname
        # GGUF lists dimensions innermost first.
        assert list(reversed([int(d) for d in t.shape])) == shapes[tname], tname


def field(reader: gguf.GGUFReader, key: str):
    f = reader.fields[key]
    return f.contents()


@pytest.mark.parametrize("base", ["llama-untied", "qwen2-tied"])
def test_metadata_and_tokenizer(workspace, base):
    name = f"{base}-meta"
    build(workspace, base, "f16", name)
    reader = gguf.GGUFReader(workspace / f"{name}.gguf")
    arch = base.split("-")[0]
    config = json.loads((workspace / base / "config.json").read_text())
    assert field(reader, "general.architecture") == arch
    assert field(reader, "general.name") == name
    assert field(reader, "general.file_type") == 1
    assert field(reader, f"{arch}.block_count") == 2
    assert field(reader, f"{arch}.embedding_length") == 64
    assert field(reader, f"{arch}.feed_forward_length") == 96
    assert field(reader, f"{arch}.context_length") == 256
    assert field(reader, f"{arch}.attention.head_count") == 4
    assert field(reader, f"{arch}.attention.head_count_kv") == 2
    assert field(reader, f"{arch}.rope.dimension_count") == 16
    assert field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    theta = config.get("rope_theta") or config["rope_parameters"]["rope_theta"]
    assert field(reader, f"{arch}.rope.freq_base") == pytest.approx(theta)
    # llama.cpp refuses 64-bit or signed variants of these
    for key in [f"{arch}.context_length", f"{arch}.block_count", "tokenizer.ggml.bos_token_id"]:
        assert reader.fields[key].types == [gguf.GGUFValueType.UINT32], key
    assert reader.fields[f"{arch}.attention.layer_norm_rms_epsilon"].types == [gguf.GGUFValueType.FLOAT32]

    tok = PreTrainedTokenizerFast.from_pretrained(workspace / base)
    tokens = field(reader, "tokenizer.ggml.tokens")
    vocab = {t: i for t, i in tok.get_vocab().items()}
    assert len(tokens) == config["vocab_size"]
    assert all(tokens[i] == t for t, i in vocab.items())
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[vocab["<s>"]] == 3 and types[vocab["<|user|>"]] == 4 and types[vocab["the"]] == 1
    merges = json.loads((workspace / base / "tokenizer.json").read_text())["model"]["merges"]
    assert field(reader, "tokenizer.ggml.merges") == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.bos_token_id") == vocab["<s>"]
    assert field(reader, "tokenizer.ggml.eos_token_id") == vocab["</s>"]
    assert field(reader, "tokenizer.ggml.padding_token_id") == vocab["<pad>"]
    assert field(reader, "tokenizer.chat_template") == tok.chat_template
    modelfile = (workspace / f"{name}.Modelfile").read_text()
    assert f"FROM ./{name}.gguf" in modelfile and 'PARAMETER stop "</s>"' in modelfile


def test_gguf_alone_is_locked_reproducible_and_verified(workspace):
    recipe, first = build(workspace, "llama-untied", "q8_0", "alone", path=False)
    nodes = json.loads(first.stdout)["nodes"]
    assert nodes["computed"] + nodes["reused"] > 0, "the adapter's tensors are fused"
    lock = (workspace / "alone.lock").read_text()
    assert "alone.gguf" in lock and "alone.Modelfile" in lock
    digest = (workspace / "alone.gguf").read_bytes()
    modelforge("verify", recipe)
    # Another weight type: nothing is recomputed, the file changes.
    _, second = build(workspace, "llama-untied", "f16", "alone", path=False)
    assert json.loads(second.stdout)["nodes"]["computed"] == 0
    assert (workspace / "alone.gguf").read_bytes() != digest
    # Back again: the same bytes as the first time.
    build(workspace, "llama-untied", "q8_0", "alone", path=False)
    assert (workspace / "alone.gguf").read_bytes() == digest
    (workspace / "alone.gguf").write_bytes(digest[:-1] + bytes([digest[-1] ^ 1]))
    bad = modelforge("verify", recipe, check=False)
    assert bad.returncode != 0 and "alone.gguf" in bad.stderr


def test_an_architecture_without_a_gguf_layout_is_refused(workspace):
    from transformers import GPT2Config, GPT2LMHeadModel

    base = workspace / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(base)
    recipe = workspace / "gpt2.toml"
    recipe.write_text('[base]\npath = "gpt2"\n[output]\ngguf = "gpt2.gguf"\n')
    run = modelforge("build", recipe, check=False)
    assert run.returncode != 0
    assert "model_type = \"gpt2\"" in run.stderr and "gguf" in run.stderr.lower()
    assert not (workspace / "gpt2.gguf").exists()
    shutil.rmtree(base)

"""`modelforge score`: each text's log-likelihood under a model, checked against transformers.

Small random LLaMA, Mistral, Qwen2, Phi-3, GPT-NeoX and GPT-2 models made here, with a word-level tokenizer
trained on the texts. The reference runs transformers' model in float32 on the same token ids
and sums log p(token_i | tokens_<i) for i >= 1 in float64.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from support import BIN, modelforge

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 64
DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
            initializer_range=0.2, bos_token_id=1, eos_token_id=2)
TEXTS = ["the cat sat on the mat",
         "a dog ran to the park and the cat ran after it",
         "the bird sang a song on the tree",
         "on the mat a bird sat",
         "song"]


def word_tokenizer(texts: list[str], bos: bool = False) -> Tokenizer:
    """A word-level tokenizer trained on `texts`; with `bos`, encoding puts `<s>` first."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>", "</s>"]))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert tok.get_vocab_size() <= VOCAB and tok.token_to_id("<s>") == 1
    return tok


def save(folder: Path, model, texts: list[str], bos: bool = False, dtype: torch.dtype | None = None,
         **save_args) -> Path:
    """`model`, its norms and biases made non-trivial, saved with a tokenizer for `texts`."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.2 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.2 * torch.randn_like(param))
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder, **save_args)
    word_tokenizer(texts, bos).save(str(folder / "tokenizer.json"))
    return folder


def texts_file(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def reference(folder: Path, texts: list[str]) -> list[tuple[int, float]]:
    """(tokens, log-likelihood from the second token on) per text, from transformers in float32."""
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").float().eval()
    out = []
    for text in texts:
        ids = tok.encode(text, add_special_tokens=True).ids
        if len(ids) < 2:
            out.append((len(ids), 0.0))
            continue
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        logp = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])
        out.append((len(ids), logp.sum().item()))
    return out


def score(folder: Path, file: Path) -> dict:
    return json.loads(modelforge("score", folder, "--texts", file, "--json", "--device", "cpu").stdout)


def check(report: dict, want: list[tuple[int, float]]) -> None:
    """Per-text counts and log-likelihoods against the reference, and the aggregates against the
    per-text values."""
    assert isinstance(report["model"], str)
    assert len(report["texts"]) == len(want)
    for i, (got, (n, logprob)) in enumerate(zip(report["texts"], want)):
        assert got["tokens"] == n, (i, got)
        assert abs(got["logprob"] - logprob) <= 1e-4 + 1e-5 * abs(logprob), (i, got, logprob)
        if n >= 2:
            assert got["nats_per_token"] == pytest.approx(-got["logprob"] / (n - 1), rel=1e-9), (i, got)
    predicted = sum(max(n - 1, 0) for n, _ in want)
    assert report["tokens"] == predicted
    total = sum(t["logprob"] for t in report["texts"])
    assert report["nats_per_token"] == pytest.approx(-total / predicted, rel=1e-9)
    assert report["perplexity"] == pytest.approx(math.exp(report["nats_per_token"]), rel=1e-9)


@pytest.mark.parametrize("config_style", ["rope_parameters", "legacy_rope_theta"])
def test_llama_gqa_matches_transformers(tmp_path, config_style):
    """GQA, untied head, rope_theta 5000, rms_norm_eps 1e-5; the rope base as transformers 5 writes
    it (`rope_parameters`) and as older configs do (top-level `rope_theta`)."""
    torch.manual_seed(0)
    config = LlamaConfig(rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, **DIMS)
    folder = save(tmp_path / "llama", LlamaForCausalLM(config), TEXTS)
    if config_style == "legacy_rope_theta":
        raw = json.loads((folder / "config.json").read_text())
        assert raw.pop("rope_parameters")["rope_theta"] == 5000.0
        raw["rope_theta"] = 5000.0
        (folder / "config.json").write_text(json.dumps(raw))
    assert AutoModelForCausalLM.from_pretrained(folder).config.rope_parameters["rope_theta"] == 5000.0
    check(score(folder, texts_file(tmp_path / "texts.txt", TEXTS)), reference(folder, TEXTS))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_tied_half_precision_llama_matches_transformers(tmp_path, dtype):
    """Tied embeddings (no lm_head.weight in the file), weights stored in 16 bits and upcast."""
    torch.manual_seed(1)
    config = LlamaConfig(tie_word_embeddings=True, **DIMS)
    folder = save(tmp_path / "tied", LlamaForCausalLM(config), TEXTS, dtype=dtype)
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
        assert f.get_tensor("model.embed_tokens.weight").dtype == dtype
    check(score(folder, texts_file(tmp_path / "texts.txt", TEXTS)), reference(folder, TEXTS))


FAMILIES = {
    "mistral": lambda: MistralForCausalLM(MistralConfig(sliding_window=64, tie_word_embeddings=False, **DIMS)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=False, **DIMS)),
    "phi3": lambda: Phi3ForCausalLM(Phi3Config(pad_token_id=0, rope_scaling=None, tie_word_embeddings=False,
                                               **DIMS)),
    # Partial rotary (a quarter of each head) and the attention and MLP side by side; then in turn.
    "gpt_neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(rotary_pct=0.25, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=128, initializer_range=0.2, bos_token_id=1, eos_token_id=2)),
    "gpt_neox-sequential": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(use_parallel_residual=False, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=128, initializer_range=0.2, bos_token_id=1, eos_token_id=2)),
    # Learned positions, Conv1D weights, tied head.
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=128,
                                               vocab_size=VOCAB, initializer_range=0.2, bos_token_id=1,
                                               eos_token_id=2)),
    # A window narrower than the longer texts: each token sees itself and the 3 before it.
    "mistral-window": lambda: MistralForCausalLM(MistralConfig(sliding_window=4, tie_word_embeddings=False,
                                                               **DIMS)),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_other_families_match_transformers(tmp_path, family):
    """Mistral (window wider than the texts), Qwen2 (q/k/v biases), Phi-3 (fused qkv and gate_up)."""
    torch.manual_seed(2)
    folder = save(tmp_path / family, FAMILIES[family](), TEXTS)
    raw = json.loads((folder / "config.json").read_text())
    assert raw["model_type"] == family.split("-")[0]
    with safe_open(folder / "model.safetensors", "pt") as f:
        names = set(f.keys())
        if family == "qwen2":
            assert f.get_tensor("model.layers.0.self_attn.q_proj.bias").abs().max() > 0
    if family == "phi3":
        assert raw.get("rope_scaling") is None and raw["rope_parameters"]["rope_type"] == "default"
        assert raw["rope_parameters"].get("partial_rotary_factor", 1.0) == 1.0
        assert "model.layers.0.self_attn.qkv_proj.weight" in names
        assert "model.layers.0.mlp.gate_up_proj.weight" in names
    check(score(folder, texts_file(tmp_path / "texts.txt", TEXTS)), reference(folder, TEXTS))


def test_sharded_model_matches_transformers(tmp_path):
    torch.manual_seed(3)
    model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=False, **DIMS))
    folder = save(tmp_path / "sharded", model, TEXTS, max_shard_size="100KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    assert not (folder / "model.safetensors").exists()
    check(score(folder, texts_file(tmp_path / "texts.txt", TEXTS)), reference(folder, TEXTS))


def test_bos_short_texts_and_empty_lines(tmp_path):
    """`<s>` added by the tokenizer's post-processor counts as the first token; a text of one token
    predicts nothing; empty lines are skipped, the rest kept in order."""
    torch.manual_seed(4)
    config = LlamaConfig(tie_word_embeddings=False, **DIMS)
    folder = save(tmp_path / "bos", LlamaForCausalLM(config), TEXTS, bos=True)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tok.encode("song").ids == [1, tok.token_to_id("song")]
    assert tok.encode("song", add_special_tokens=False).ids == [tok.token_to_id("song")]

    texts = ["the cat sat on the mat", "song", "a bird", TEXTS[1], "zebra on the mat"]
    lines = ["", texts[0], texts[1], "", "", texts[2], texts[3], texts[4], ""]
    want = reference(folder, texts)
    assert [n for n, _ in want] == [7, 2, 3, 13, 5]
    check(score(folder, texts_file(tmp_path / "texts.txt", lines)), want)

    # Without the post-processor, a one-word text has no token to predict.
    word_tokenizer(TEXTS).save(str(folder / "tokenizer.json"))
    texts = ["song", "the cat sat on the mat", "mat"]
    want = reference(folder, texts)
    assert [n for n, _ in want] == [1, 6, 1]
    report = score(folder, texts_file(tmp_path / "plain.txt", ["song", "", "the cat sat on the mat", "mat"]))
    assert report["texts"][0]["logprob"] == 0.0 and report["texts"][2]["logprob"] == 0.0
    check(report, want)


def test_another_family_is_refused(tmp_path):
    torch.manual_seed(5)
    folder = tmp_path / "opt"
    OPTForCausalLM(OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                             word_embed_proj_dim=32, vocab_size=VOCAB)).save_pretrained(folder)
    word_tokenizer(TEXTS).save(str(folder / "tokenizer.json"))
    done = modelforge("score", folder, "--texts", texts_file(tmp_path / "texts.txt", TEXTS), "--json",
                      check=False)
    assert done.returncode != 0
    assert "`opt` model" in done.stderr, done.stderr
    for supported in ["llama", "mistral", "qwen2", "phi3", "gpt_neox", "gpt2"]:
        assert supported in done.stderr, done.stderr


def test_settings_and_biases_the_pass_does_not_compute_are_refused(tmp_path):
    """GPT-2 without its attention scaling, and a bias config.json says a model does not have
    (transformers would drop it), are refused rather than scored otherwise than transformers."""
    torch.manual_seed(11)
    folder = save(tmp_path / "gpt2", GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=4, n_positions=64,
                                                                vocab_size=VOCAB, scale_attn_weights=False)),
                  TEXTS)
    texts = texts_file(tmp_path / "texts.txt", TEXTS)
    done = modelforge("score", folder, "--texts", texts, check=False)
    assert done.returncode != 0 and "scale_attn_weights" in done.stderr, done.stderr

    folder = save(tmp_path / "llama", LlamaForCausalLM(LlamaConfig(attention_bias=True, **DIMS)), TEXTS)
    config = json.loads((folder / "config.json").read_text())
    config["attention_bias"] = False
    (folder / "config.json").write_text(json.dumps(config))
    done = modelforge("score", folder, "--texts", texts, check=False)
    assert done.returncode != 0 and "self_attn" in done.stderr and ".bias" in done.stderr, done.stderr


def test_a_tensor_the_pass_would_not_use_is_refused(tmp_path):
    """A checkpoint holding a tensor the forward pass has no place for is refused, naming it, rather
    than scored without it."""
    torch.manual_seed(7)
    folder = save(tmp_path / "llama", LlamaForCausalLM(LlamaConfig(**DIMS)), TEXTS)
    from safetensors.torch import load_file, save_file
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.self_attn.extra.weight"] = torch.zeros(4)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    done = modelforge("score", folder, "--texts", texts_file(tmp_path / "texts.txt", TEXTS), check=False)
    assert done.returncode != 0
    assert "model.layers.1.self_attn.extra.weight" in done.stderr, done.stderr


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    """Llama 3's frequency-dependent rotary scaling, with an original context short enough that all
    three bands (kept, scaled, smoothed) occur at head_dim 16."""
    torch.manual_seed(8)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8, "rope_theta": 10000.0}
    folder = save(tmp_path / "llama3", LlamaForCausalLM(LlamaConfig(rope_parameters=scaling, **DIMS)), TEXTS)
    assert json.loads((folder / "config.json").read_text())["rope_parameters"]["rope_type"] == "llama3"
    check(score(folder, texts_file(tmp_path / "texts.txt", TEXTS)), reference(folder, TEXTS))


def test_plain_output_runs(tmp_path):
    """Without `--json`, a readable report and a zero exit."""
    torch.manual_seed(6)
    folder = save(tmp_path / "llama", LlamaForCausalLM(LlamaConfig(**DIMS)), TEXTS)
    done = modelforge("score", folder, "--texts", texts_file(tmp_path / "texts.txt", TEXTS))
    assert done.stdout.strip()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_an_adapter_scores_as_peft_merges_it(tmp_path, family):
    """`--adapter`: a LoRA (on attention, the MLP and, for LLaMA, the embedding, with the head
    trained whole as `modules_to_save`; GPT-2's Conv1D transposed) added as the weights are read
    equals PEFT's merged model; a DoRA adapter is refused, naming what to do instead."""
    from peft import LoraConfig, PeftModel, get_peft_model
    torch.manual_seed(9)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **DIMS))
        targets = ["q_proj", "v_proj", "down_proj", "embed_tokens"]
    else:
        model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=128,
                                           vocab_size=VOCAB, initializer_range=0.2))
        targets = ["c_attn", "c_fc"]
    folder = save(tmp_path / family, model, TEXTS)
    base = AutoModelForCausalLM.from_pretrained(folder)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                                           fan_in_fan_out=family == "gpt2",
                                           modules_to_save=["lm_head"] if family == "llama" else None))
    if family == "llama":
        with torch.no_grad():
            head = peft.base_model.model.lm_head.modules_to_save["default"].weight
            head.add_(0.3 * torch.randn_like(head))
    peft.save_pretrained(tmp_path / "adapter")
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "adapter")
    merged.merge_and_unload().save_pretrained(tmp_path / "merged")
    (tmp_path / "merged" / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    texts = texts_file(tmp_path / "texts.txt", TEXTS)
    with_adapter = json.loads(modelforge("score", folder, "--adapter", tmp_path / "adapter", "--texts", texts,
                                         "--json").stdout)
    check(with_adapter, reference(tmp_path / "merged", TEXTS))
    without = score(folder, texts)
    assert max(abs(a["logprob"] - b["logprob"]) for a, b in zip(with_adapter["texts"], without["texts"])) > 0.1

    dora = get_peft_model(AutoModelForCausalLM.from_pretrained(folder),
                          LoraConfig(r=4, target_modules=targets[:1], use_dora=True,
                                     fan_in_fan_out=family == "gpt2"))
    dora.save_pretrained(tmp_path / "dora")
    done = modelforge("score", folder, "--adapter", tmp_path / "dora", "--texts", texts, check=False)
    assert done.returncode != 0 and "DoRA" in done.stderr and "modelforge build" in done.stderr, done.stderr


def test_examples_in_a_recipe_give_the_effect_the_build_keeps(tmp_path, monkeypatch):
    """`examples` in a recipe: the transfer report gives Σ δₛ·δₜ / Σ δₛ² over the texts, δₛ each
    text's log-likelihood change on the source base when the adapter is added (PEFT's model
    here) and δₜ on the base when the build is (the built model against the base). Into the
    source itself, the build keeps the whole effect; into another base, what transformers says.
    Changing the examples rebuilds the report; `examples` without `source` is refused."""
    from peft import LoraConfig, PeftModel, get_peft_model
    torch.manual_seed(10)
    source = save(tmp_path / "source", LlamaForCausalLM(LlamaConfig(**DIMS)), TEXTS)
    other = save(tmp_path / "other", LlamaForCausalLM(LlamaConfig(**DIMS)), TEXTS)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(source),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                     init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    (tmp_path / "adapter-merged").mkdir()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source), tmp_path / "adapter") \
        .merge_and_unload().save_pretrained(tmp_path / "adapter-merged")
    (tmp_path / "adapter-merged" / "tokenizer.json").write_bytes((source / "tokenizer.json").read_bytes())
    examples = texts_file(tmp_path / "examples.txt", TEXTS[:4])

    # The engine, through a wrapper that counts the forward passes.
    passes = tmp_path / "passes.log"
    engine = tmp_path / "engine"
    engine.write_text(f'#!/bin/sh\n[ "$1" = score ] && echo score >> "{passes}"\n'
                      f'exec "{BIN.with_name("modelforge-engine")}" "$@"\n')
    engine.chmod(0o755)
    monkeypatch.setenv("MODELFORGE_ENGINE", str(engine))
    counted = lambda: len(passes.read_text().splitlines()) if passes.exists() else 0

    def build(base: Path, name: str, weight: float = 1.0) -> dict:
        recipe = tmp_path / f"{name}.toml"
        recipe.write_text(f'[base]\npath = "{base}"\n\n[[adapter]]\npath = "{tmp_path / "adapter"}"\n'
                          f'source = "{source}"\nexamples = "{examples}"\nweight = {weight}\n\n'
                          f'[output]\npath = "{tmp_path / name}"\n')
        modelforge("build", recipe, "--quiet", "--cache", tmp_path / "cache")
        (adapter,) = json.loads((tmp_path / name / "transfer.json").read_text())["adapters"]
        return adapter

    def kept(base: Path, built: Path) -> float:
        ll = lambda folder: [lp for _, lp in reference(folder, TEXTS[:4])]
        ds = [a - b for a, b in zip(ll(tmp_path / "adapter-merged"), ll(source))]
        dt = [a - b for a, b in zip(ll(built), ll(base))]
        return sum(a * b for a, b in zip(ds, dt)) / sum(a * a for a in ds)

    itself = build(source, "into-source")
    assert itself["effect"]["examples"] == 4
    assert itself["effect"]["kept"] == pytest.approx(1.0, abs=1e-4)
    assert itself["verdict"] == "keeps its effect on the examples"
    # Four passes, one of them twice: the base is the source, scored without the adapter once.
    assert counted() == 3
    carried = build(other, "into-other")
    assert carried["effect"]["kept"] == pytest.approx(kept(other, tmp_path / "into-other"), abs=1e-3)
    # The source's passes are cached: a build into another base scores only the base and the
    # built model; then, the adapter weighted anew, only the built model.
    assert counted() == 3 + 2
    half = build(other, "into-other", weight=0.5)
    assert counted() == 3 + 2 + 1
    assert half["effect"]["kept"] == pytest.approx(kept(other, tmp_path / "into-other"), abs=1e-3)
    assert half["effect"]["kept"] != carried["effect"]["kept"]

    # Up to date: the summary's verdict is the output's, measured when it was built.
    summary = json.loads(modelforge("build", tmp_path / "into-other.toml", "--json", "--cache",
                                    tmp_path / "cache").stdout)
    assert summary["up_to_date"] is True
    (said,) = summary["carried"]
    assert said["effect"]["kept"] == half["effect"]["kept"] and said["verdict"] == half["verdict"], said

    # Other examples: not up to date, and the report says so.
    texts_file(examples, TEXTS[1:])
    again = build(other, "into-other")
    assert again["effect"]["examples"] == 4 and again["effect"]["kept"] != carried["effect"]["kept"]

    # An engine that cannot score: the model is built all the same, with a warning, and the
    # verdict comes from the weights.
    engine.write_text(f'#!/bin/sh\n[ "$1" = score ] && {{ echo "no scoring here" >&2; exit 3; }}\n'
                      f'exec "{BIN.with_name("modelforge-engine")}" "$@"\n')
    texts_file(examples, TEXTS[:3])
    recipe = tmp_path / "into-other.toml"
    done = modelforge("build", recipe, "--quiet", "--cache", tmp_path / "cache")
    assert "warning: the examples of" in done.stderr and "no scoring here" in done.stderr, done.stderr
    (unscored,) = json.loads((tmp_path / "into-other" / "transfer.json").read_text())["adapters"]
    assert "effect" not in unscored and unscored["verdict"] == "unrelated bases: expect nothing", unscored

    # Two adapters: the built model's change is not one adapter's, and examples are refused.
    recipe = tmp_path / "two.toml"
    recipe.write_text(f'[base]\npath = "{other}"\n\n[[adapter]]\npath = "{tmp_path / "adapter"}"\n'
                      f'source = "{source}"\nexamples = "{examples}"\n\n[[adapter]]\npath = "{tmp_path / "adapter"}"\n\n'
                      f'[output]\npath = "{tmp_path / "two"}"\n')
    done = modelforge("build", recipe, check=False)
    assert done.returncode != 0 and "measure one adapter carried alone" in done.stderr, done.stderr

    recipe = tmp_path / "no-source.toml"
    recipe.write_text(f'[base]\npath = "{other}"\n\n[[adapter]]\npath = "{tmp_path / "adapter"}"\n'
                      f'examples = "{examples}"\n\n[output]\npath = "{tmp_path / "x"}"\n')
    done = modelforge("build", recipe, check=False)
    assert done.returncode != 0 and "`examples` needs the adapter's `source` base" in done.stderr, done.stderr

"""Writes the fuzz targets' seed inputs into seeds/ (committed; rerun after editing this).

Seeds are small valid inputs, so that libFuzzer starts from the structure it has to break:
safetensors files with a few tensors, adapter configs as PEFT writes them, and recipes that
use every key."""
import json
import pathlib
import struct

HERE = pathlib.Path(__file__).parent
SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1, "BOOL": 1, "F8_E4M3": 1}


def safetensors(tensors, metadata=None, pad=0):
    """tensors: (name, dtype, shape) in data order."""
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape in tensors:
        n = SIZES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + n]}
        data += bytes((i * 7 + 3) % 256 for i in range(n))
    text = json.dumps(header, separators=(",", ":")).encode() + b" " * pad
    return struct.pack("<Q", len(text)) + text + data


def write(target, name, content):
    path = HERE / "seeds" / target / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())


write("safetensors_header", "empty", safetensors([]))
write("safetensors_header", "two_f32", safetensors([("a", "F32", [2, 2]), ("b", "F32", [3])]))
write("safetensors_header", "metadata_padded", safetensors(
    [("model.layers.0.self_attn.q_proj.weight", "BF16", [4, 4]), ("model.norm.weight", "F16", [4])],
    metadata={"format": "pt"}, pad=5))
write("safetensors_header", "dtypes", safetensors(
    [(f"t{i}", d, [2, 1]) for i, d in enumerate(SIZES)] + [("scalar", "F32", []), ("zero", "F32", [0, 3])]))
write("safetensors_header", "lora", safetensors([
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "F32", [2, 4]),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", "F32", [4, 2]),
]))

peft = {
    "peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "bias": "none",
    "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "meta-llama/Llama-3.2-1B",
    "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
    "rank_pattern": {}, "alpha_pattern": {}, "task_type": "CAUSAL_LM",
}
write("adapter_config", "plain.json", json.dumps(peft, indent=2))
write("adapter_config", "patterns.json", json.dumps({
    **peft, "use_rslora": True, "target_modules": r".*\.(q|v)_proj",
    "rank_pattern": {"q_proj": 4, r"layers\.1\..*": 2}, "alpha_pattern": {"v_proj": 32.5},
}))
write("adapter_config", "minimal.json", '{"r": 1}')

write("recipe", "plain.toml", """[base]
path = "base"

[[adapter]]
path = "lora"
weight = 0.8

[output]
path = "out"
""")
write("recipe", "every_key.toml", """[base]
path = "../models/base"
arch = "chatglm2"

[[adapter]]
path = "a"
arch = "llama"
weight = [ { value = 1.0 }, { layers = "16..", value = 0.5 }, { modules = ["q_proj", "v_proj"], layers = "0..4", value = 0.0 } ]

[[adapter]]
path = "b"

[output]
path = "build/out"
dtype = "bf16"
max_shard_size = "2GB"

[build]
device = "cuda:1"
""")

# Every shipped schema is a seed for the schema reader.
for schema in sorted((HERE.parent / "arch").glob("*.toml")):
    write("arch_schema", schema.name, schema.read_text())

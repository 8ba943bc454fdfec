"""What the experiment measures on a model: losses, log-probabilities in canonical token order,
residual-stream states; and the statistics it compares them with."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


class Probe:
    """A model (a base, a base with a PEFT adapter, or a fused output) and its word numbering."""

    def __init__(self, directory: Path, permutation: torch.Tensor, adapter: Path | None = None):
        model = AutoModelForCausalLM.from_pretrained(directory)
        if adapter is not None:
            from peft import PeftModel
            model = PeftModel.from_pretrained(model, adapter)
        self.model = model.eval()
        self.perm = permutation
        self.layers = model.config.num_hidden_layers

    @torch.no_grad()
    def scores(self, batches: torch.Tensor) -> tuple[float, float]:
        """Mean next-token cross-entropy and top-1 accuracy over `batches` [n, B, L] of canonical ids."""
        total, right, count = 0.0, 0, 0
        for ids in batches:
            ids = self.perm[ids]
            logits = self.model(input_ids=ids).logits[:, :-1]
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
            right += (logits.argmax(-1) == ids[:, 1:]).sum().item()
            count += ids[:, 1:].numel()
        return total / count, right / count

    @torch.no_grad()
    def randomize(self, seed: int) -> None:
        """Every LoRA module's factors replaced by random ones whose product has the same norm:
        an adapter of the same size pointing nowhere in particular (the floor of any transfer)."""
        g = torch.Generator().manual_seed(seed)
        for name, module in sorted(self.model.named_modules(), key=lambda m: m[0]):
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                size = (b @ a).norm()
                a2, b2 = torch.randn(a.shape, generator=g), torch.randn(b.shape, generator=g)
                a.copy_(a2)
                b.copy_(b2 * size / (b2 @ a2).norm())

    @torch.no_grad()
    def logprobs(self, ids: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [B, L, V] with the vocabulary in canonical order."""
        lp = torch.log_softmax(self.model(input_ids=self.perm[ids]).logits.double(), -1)
        return lp[..., self.perm]

    @torch.no_grad()
    def streams(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """The residual stream entering each layer, [B·L, d] per layer."""
        hidden = self.model(input_ids=self.perm[ids], output_hidden_states=True).hidden_states
        return [h.reshape(-1, h.shape[-1]).double() for h in hidden[: self.layers]]

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Input embedding and output head rows, in canonical token order."""
        e = self.model.get_input_embeddings().weight.detach().double()[self.perm]
        u = self.model.get_output_embeddings().weight.detach().double()[self.perm]
        return e, u


def residual_map(source: torch.Tensor, target: torch.Tensor, dims: str) -> torch.Tensor:
    """R (d_t × d_s) as the mode uses it: for `align`, modelforge's map (the polar factor of the
    least-squares map of the shared tokens' source embeddings onto the target's); for the index
    modes (`exact`, `truncate`, `pad`), the identity, cut or padded."""
    d_s, d_t = source.shape[1], target.shape[1]
    if dims != "align":
        return torch.eye(d_t, d_s, dtype=torch.float64)
    solution = torch.linalg.lstsq(source, target, driver="gelsd").solution  # d_s × d_t
    u, _, vh = torch.linalg.svd(solution.T, full_matrices=False)
    return u @ vh


def mean_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(x, y, dim=-1).mean().item()


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x - x.mean(0), y - y.mean(0)
    return ((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm())).item()


def text_logprob(logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Each text's log-likelihood (the sum of its next-token log-probabilities), [B], from
    `logprobs` [B, L, V] in canonical order and the texts' canonical ids [B, L]: a number that
    does not depend on how a model's tokenizer cuts the text."""
    return logprobs[:, :-1].gather(-1, ids[:, 1:, None]).sum((1, 2))


def projection(reference: torch.Tensor, other: torch.Tensor) -> float:
    """How much of `reference` `other` reproduces: ⟨r, o⟩ / ⟨r, r⟩ (1: all of it, 0: none)."""
    r, o = reference.flatten(), other.flatten()
    return (r @ o / (r @ r)).item()


LAYER = re.compile(r"\.(\d+)\.")


def layer_pairs(report: list[dict] | None, source_layers: int, target_layers: int) -> list[tuple[int, int]]:
    """(source layer, target layer) of every module the build fused, from transfer.json; the
    same layers when there is no report (nothing was mapped)."""
    if not report:
        return [(i, i) for i in range(min(source_layers, target_layers))]
    pairs = set()
    for row in report:
        target = re.search(r"`([^`]*)`", row["fate"]) if row["fate"].startswith("fused") else None
        if target:
            pairs.add((int(LAYER.search(row["module"]).group(1)), int(LAYER.search(target.group(1)).group(1))))
    return sorted(pairs)


def spearman(x: list[float], y: list[float]) -> float | None:
    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None]
    if len(pairs) < 3:
        return None

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    a, b = ranks([p[0] for p in pairs]), ranks([p[1] for p in pairs])
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((p - ma) * (q - mb) for p, q in zip(a, b))
    va, vb = sum((p - ma) ** 2 for p in a), sum((q - mb) ** 2 for q in b)
    if va == 0 or vb == 0:
        return None
    return cov / (va * vb) ** 0.5


def auc(score: list[float | None], positive: list[bool]) -> float | None:
    """The chance that a row where the adapter helps scores above one where it does not (ties
    count half): how well `score` separates the two."""
    pos = [s for s, p in zip(score, positive) if p and s is not None]
    neg = [s for s, p in zip(score, positive) if not p and s is not None]
    if not pos or not neg:
        return None
    return sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))


# --- modelforge's subspace overlap, recomputed ---------------------------------------------

ROLES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
         "down_proj": "down"}
WRITERS = {"o", "down"}
CONV1D = ("attn.c_attn.", "attn.c_proj.", "mlp.c_fc.", "mlp.c_proj.")


def module_weight(state: dict, family: str, tensor: str, role: str | None, heads: int) -> torch.Tensor:
    """A base's weight for one module, (out × in) as a LoRA sees it; for a part of a fused tensor
    (`role` given), that part's rows."""
    w = state[tensor].double()
    if family == "gpt2" and any(c in tensor for c in CONV1D):
        w = w.T
    if role is None:
        return w
    if family == "gpt_neox":  # per head: [q_h; k_h; v_h]
        part = "qkv".index(role)
        return w.view(heads, 3, -1, w.shape[1])[:, part].reshape(-1, w.shape[1])
    parts = {"qkv": "qkv", "gate_up": ("gate", "up")}["gate_up" if role in ("gate", "up") else "qkv"]
    return w.chunk(len(parts))[list(parts).index(role)]  # stacked, equal parts (kv heads = heads here)


def leading_overlap(ws: torch.Tensor, wt: torch.Tensor, r: torch.Tensor, writer: bool) -> float:
    """modelforge's figure: the mean cosine of the principal angles between the leading residual-side
    singular subspaces (an eighth of the width) of the source weight mapped by R and the target's."""
    if writer:
        ws, wt = ws.T, wt.T
    mapped = ws @ r.T
    k = max(1, min(mapped.shape[1], wt.shape[1]) // 8)
    vs = torch.linalg.svd(mapped, full_matrices=False)[2][:k].T
    vt = torch.linalg.svd(wt, full_matrices=False)[2][:k].T
    return torch.linalg.svdvals(vs.T @ vt).mean().item()


def overlap_in_any_mode(report: list[dict], source: tuple, target: tuple, r: torch.Tensor) -> float | None:
    """modelforge's subspace overlap (transfer.json's `overlap`) recomputed from the weights, for
    whatever map the mode uses (R for align, the identity, cut or padded, for the others):
    `report` is transfer.json's modules, `source` and `target` (state, family, heads). Mean over
    the modules the build fused."""
    pairs = []
    for row in report:
        found = re.search(r"`([^`]*)`", row["fate"])
        if row["fate"].startswith("fused") and found:
            role = ROLES.get(row["module"].rsplit(".", 1)[1]) if "by role into part" in row["fate"] else None
            pairs.append((row["module"], found.group(1), role))
    values = []
    for module, tensor, role in pairs:
        leaf = module.rsplit(".", 1)[1]
        ws = module_weight(source[0], source[1], f"{module}.weight", None, source[2])
        wt = module_weight(target[0], target[1], tensor, role, target[2])
        writer = ROLES.get(leaf) in WRITERS or leaf in ("dense", "dense_4h_to_h") or tensor.endswith(("o_proj.weight", "down_proj.weight"))
        values.append(leading_overlap(ws, wt, r, writer))
    return sum(values) / len(values) if values else None

"""One table: where each supported model family keeps its embedding, blocks, attention, FFN, norms and head.

Every operation that needs to know a model's parts (structured pruning, LISA/HFT's blocks, pruning
targets, growth, vocabulary changes) asks `arch_of(model, operation)`; a family missing from the
table is a one-line ModelError naming it and the operation. The entries were read off the
modeling code of transformers 5 (`transformers/models/<family>/modeling_<family>.py`) and are
checked by tests/unit/test_arch.py on a tiny model of each family.

Paths are module names: `embedding`, `blocks`, `final_norm`, `head` from the task model (the
*ForCausalLM / *ForMaskedLM); the attention, FFN and norm names from one block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tunelab.errors import ModelError

SHRINKS = ("heads", "ffn", "layers")  # structured pruning (ops/structured.py)


@dataclass(frozen=True)
class Arch:
    family: str  # HF model_type
    kind: str  # "causal" or "masked"
    embedding: str
    blocks: str  # the ModuleList of blocks
    qkv: tuple[str, ...]  # q, k, v projections, or one fused projection
    attn_out: str  # o
    ffn_in: tuple[str, ...]  # gate, up (their output rows are the neurons); or fc1; or one fused [gate; up]
    ffn_out: str  # down / fc2 (its input columns are the neurons)
    norms: tuple[str, ...]  # in a block
    final_norm: str | None
    head: str
    tied: bool  # the config class's default tie_word_embeddings
    n_heads: str = "num_attention_heads"  # config fields
    n_kv_heads: str | None = "num_key_value_heads"  # None: every head has its own keys and values
    ffn_size: str = "intermediate_size"
    n_layers: str = "num_hidden_layers"
    fused_gate_up: bool = False  # ffn_in is one matrix: gate rows, then up rows (chunk(2) in forward)
    conv1d: bool = False  # weights stored (in, out): GPT-2's Conv1D
    sdpa: bool = True  # transformers runs it with torch's scaled_dot_product_attention
    refuses: dict[str, str] = field(default_factory=dict)  # structured pruning it cannot do -> why

    @property
    def projections(self) -> tuple[str, ...]:
        """Every matrix of a block's attention and FFN (what unstructured pruning prunes)."""
        return (*self.qkv, self.attn_out, *self.ffn_in, self.ffn_out)

    @property
    def attention(self) -> str:
        return self.attn_out.rsplit(".", 1)[0]

    def shrinks(self) -> tuple[str, ...]:
        return tuple(what for what in SHRINKS if what not in self.refuses)

    def check(self, what: str) -> None:
        """A one-line ModelError when the family cannot be pruned this way (heads, ffn, layers)."""
        if what in self.refuses:
            raise ModelError(f"{what}: cannot remove {what} from {self.family}: {self.refuses[what]}; "
                             f"prune {' or '.join(self.shrinks())} instead")

    def block_list(self, model):
        return model.get_submodule(self.blocks)


def _decoder(family: str, tied: bool = False, norms=(), refuses=None, **kw) -> Arch:
    """The llama layout: model.layers[i].self_attn.{q,k,v,o}_proj, .mlp.{gate,up,down}_proj."""
    fields = dict(family=family, kind="causal", embedding="model.embed_tokens", blocks="model.layers",
                  qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), attn_out="self_attn.o_proj",
                  ffn_in=("mlp.gate_proj", "mlp.up_proj"), ffn_out="mlp.down_proj",
                  norms=norms or ("input_layernorm", "post_attention_layernorm"), final_norm="model.norm",
                  head="lm_head", tied=tied, refuses=refuses or {})
    return Arch(**{**fields, **kw})


_QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")
_GEMMA_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm")
_FUSED_QKV = "its q, k and v are one fused matrix, which this surgery does not slice"
_BERT = dict(kind="masked", blocks="", qkv=("attention.self.query", "attention.self.key", "attention.self.value"),
             attn_out="attention.output.dense", ffn_in=("intermediate.dense",), ffn_out="output.dense",
             norms=("attention.output.LayerNorm", "output.LayerNorm"), final_norm=None, tied=True, n_kv_heads=None,
             refuses={"heads": "its attention takes the head size as hidden_size / num_attention_heads, so fewer "
                               "heads cannot be written in its config"})

FAMILIES: dict[str, Arch] = {a.family: a for a in (
    _decoder("llama"),
    _decoder("mistral"),
    _decoder("qwen2"),
    _decoder("qwen3", norms=("input_layernorm", "post_attention_layernorm", *_QK_NORMS)),
    _decoder("gemma2", tied=True, norms=_GEMMA_NORMS, sdpa=False),  # attention logit soft-capping: eager only
    _decoder("gemma3_text", tied=True, norms=(*_GEMMA_NORMS, *_QK_NORMS)),
    _decoder("granite"),
    _decoder("smollm3", tied=True),
    _decoder("olmo2", norms=("post_attention_layernorm", "post_feedforward_layernorm", *_QK_NORMS),
             refuses={"heads": "its q_norm and k_norm normalise all heads together, so removing heads changes "
                               "the others"}),
    _decoder("phi3", qkv=("self_attn.qkv_proj",), ffn_in=("mlp.gate_up_proj",), fused_gate_up=True,
             refuses={"heads": _FUSED_QKV}),
    Arch(family="gpt2", kind="causal", embedding="transformer.wte", blocks="transformer.h", qkv=("attn.c_attn",),
         attn_out="attn.c_proj", ffn_in=("mlp.c_fc",), ffn_out="mlp.c_proj", norms=("ln_1", "ln_2"),
         final_norm="transformer.ln_f", head="lm_head", tied=True, n_heads="n_head", n_kv_heads=None,
         ffn_size="n_inner", n_layers="n_layer", conv1d=True, refuses={"heads": _FUSED_QKV}),
    Arch(family="gpt_neox", kind="causal", embedding="gpt_neox.embed_in", blocks="gpt_neox.layers",
         qkv=("attention.query_key_value",), attn_out="attention.dense", ffn_in=("mlp.dense_h_to_4h",),
         ffn_out="mlp.dense_4h_to_h", norms=("input_layernorm", "post_attention_layernorm"),
         final_norm="gpt_neox.final_layer_norm", head="lm_head", tied=False, n_kv_heads=None,
         refuses={"heads": _FUSED_QKV}),
    Arch(**{**_BERT, "family": "bert", "embedding": "bert.embeddings.word_embeddings",
            "blocks": "bert.encoder.layer", "head": "cls.predictions.decoder"}),
    Arch(**{**_BERT, "family": "roberta", "embedding": "roberta.embeddings.word_embeddings",
            "blocks": "roberta.encoder.layer", "head": "lm_head.decoder"}),
    Arch(family="modernbert", kind="masked", embedding="model.embeddings.tok_embeddings", blocks="model.layers",
         qkv=("attn.Wqkv",), attn_out="attn.Wo", ffn_in=("mlp.Wi",), ffn_out="mlp.Wo", norms=("attn_norm", "mlp_norm"),
         final_norm="model.final_norm", head="decoder", tied=True, n_kv_heads=None, fused_gate_up=True,
         refuses={"heads": _FUSED_QKV, "layers": "its first layer has no attention norm (the embeddings' norm "
                                                  "serves), so the layers are not interchangeable"}),
)}


def arch_of(model_or_config, operation: str) -> Arch:
    """The table entry of a model (or its HF config); a one-line ModelError for a family not in the table."""
    config = getattr(model_or_config, "config", model_or_config)
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        raise ModelError(f"{operation}: model family {family!r} is not in tunelab's architecture table "
                         f"(tunelab/arch.py); supported: {', '.join(FAMILIES)}")
    return FAMILIES[family]


def block_params(model, operation: str) -> tuple[str, list[list[str]]]:
    """(blocks path, parameter names of each block) as model.named_parameters() names them."""
    prefix = arch_of(model, operation).blocks
    blocks: list[list[str]] = [[] for _ in model.get_submodule(prefix)]
    for name, _ in model.named_parameters():
        if name.startswith(prefix + "."):
            blocks[int(name[len(prefix) + 1:].split(".")[0])].append(name)
    return prefix, blocks


def is_conv1d(module) -> bool:
    """GPT-2's linear layer (transformers' Conv1D): its weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D"


def attn_implementation(config, requested: str) -> str:
    """The attention kernel to load a model with: the default sdpa becomes eager for a family without it."""
    family = FAMILIES.get(getattr(config, "model_type", None))
    return "eager" if requested == "sdpa" and family is not None and not family.sdpa else requested

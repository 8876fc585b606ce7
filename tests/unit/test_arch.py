"""The architecture table (tunelab/arch.py) against a tiny model of every family built from transformers' own
config class: every named module exists, the table names every weight of a block, the config fields hold what
the weights show, and unknown families and refused operations are one-line errors."""

from __future__ import annotations

import pytest
import torch
from families import CAUSAL, MASKED, tiny_model

from tunelab import arch
from tunelab.errors import ModelError


@pytest.mark.parametrize("family", CAUSAL + MASKED)
def test_the_table_names_every_part_of_a_tiny_model(family):
    model = tiny_model(family)
    spec = arch.arch_of(model, "test")
    config = model.config
    assert spec.family == config.model_type == family and spec.kind == ("masked" if family in MASKED else "causal")
    assert model.get_submodule(spec.embedding) is model.get_input_embeddings()
    assert model.get_submodule(spec.head) is model.get_output_embeddings()
    assert spec.tied == type(config)().tie_word_embeddings  # the config class's default, as the table says
    if spec.final_norm:
        assert "norm" in type(model.get_submodule(spec.final_norm)).__name__.lower()
    blocks = spec.block_list(model)
    assert isinstance(blocks, torch.nn.ModuleList) and len(blocks) == getattr(config, spec.n_layers) == 2

    n_heads = getattr(config, spec.n_heads)
    n_kv = getattr(config, spec.n_kv_heads) if spec.n_kv_heads else n_heads
    assert (n_heads, n_kv) == (4, 2 if spec.n_kv_heads else 4)
    ffn = getattr(config, spec.ffn_size) or 4 * config.hidden_size  # gpt2: n_inner None means 4 x hidden
    for block in blocks:
        # The projections and norms named in the table hold every parameter of the block, each once.
        named = [f"{m}.{p}" for m in (*spec.projections, *spec.norms)
                 for p, _ in block.get_submodule(m).named_parameters()]
        assert sorted(named) == sorted(n for n, _ in block.named_parameters())
        out, down = block.get_submodule(spec.attn_out), block.get_submodule(spec.ffn_out)
        width = 0 if spec.conv1d else 1  # the weight dimension of a layer's inputs
        assert out.weight.shape[width] == n_heads * 8 and down.weight.shape[width] == ffn
        for name in spec.ffn_in:
            rows = block.get_submodule(name).weight.shape[1 - width]
            assert rows == (2 * ffn if spec.fused_gate_up else ffn), name
        qkv_rows = sum(block.get_submodule(n).weight.shape[1 - width] for n in spec.qkv)
        assert qkv_rows == (n_heads + 2 * n_kv) * 8
        if "heads" in spec.shrinks():
            assert block.get_submodule(spec.attention).head_dim == 8


def test_block_params_lists_each_blocks_tensors():
    model = tiny_model("llama")
    prefix, blocks = arch.block_params(model, "lisa")
    assert prefix == "model.layers" and len(blocks) == 2
    assert blocks[1] == [n for n, _ in model.named_parameters() if n.startswith("model.layers.1.")]
    assert len(blocks[0]) == 9  # q, k, v, o, gate, up, down, two norms


def test_unknown_family_is_a_one_line_error_naming_it_and_the_operation():
    from transformers import FalconConfig

    with pytest.raises(ModelError) as err:
        arch.arch_of(FalconConfig(), "lisa")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("lisa: model family 'falcon' is not in tunelab's architecture table")
    assert "llama" in message and "modernbert" in message


def test_refused_operations_name_the_family_and_what_it_allows():
    with pytest.raises(ModelError, match=r"^heads: cannot remove heads from phi3: its q, k and v are one fused "
                                         r"matrix.*; prune ffn or layers instead$"):
        arch.FAMILIES["phi3"].check("heads")
    with pytest.raises(ModelError, match=r"^layers: cannot remove layers from modernbert: .*; prune ffn instead$"):
        arch.FAMILIES["modernbert"].check("layers")
    arch.FAMILIES["llama"].check("heads")  # allowed: no error
    assert arch.FAMILIES["olmo2"].shrinks() == ("ffn", "layers")


def test_gemma2_loads_eager_where_sdpa_is_asked():
    gemma2, llama = arch.FAMILIES["gemma2"], arch.FAMILIES["llama"]
    assert not gemma2.sdpa and llama.sdpa
    config = tiny_model("gemma2").config
    assert arch.attn_implementation(config, "sdpa") == "eager"
    assert arch.attn_implementation(config, "eager") == "eager"
    assert arch.attn_implementation(tiny_model("llama").config, "sdpa") == "sdpa"

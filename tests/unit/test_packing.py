"""Fixed-length windows over a token stream, and position ids that restart per document."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tunelab.data import PackedSequences, collate

EOS = 0


def test_windows_are_consecutive_slices_and_the_tail_is_dropped():
    tokens = np.arange(1, 24, dtype=np.uint16)  # 23 tokens, seq_len 5: 4 windows, 3 tokens dropped
    packed = PackedSequences(tokens, seq_len=5, eos_id=EOS, document_mask=False)
    assert len(packed) == 4
    for i in range(4):
        sample = packed[i]
        assert list(sample) == ["input_ids"]
        assert sample["input_ids"].dtype == np.int64
        assert sample["input_ids"].tolist() == list(range(1 + 5 * i, 6 + 5 * i))
    with pytest.raises(IndexError):
        packed[4]


def test_fewer_tokens_than_one_window():
    assert len(PackedSequences(np.arange(3, dtype=np.uint16), 8, EOS, True)) == 0


def test_position_ids_restart_after_every_eos():
    #         doc A ends here v      doc B ends v   doc C runs on
    tokens = np.array([5, 6, 7, EOS, 8, 9, EOS, EOS, 3, 4, 5, 6], dtype=np.uint32)
    packed = PackedSequences(tokens, seq_len=6, eos_id=EOS, document_mask=True)
    assert packed[0]["position_ids"].tolist() == [0, 1, 2, 3, 0, 1]
    assert packed[0]["position_ids"].dtype == np.int64
    # Window 2 starts mid-document B's EOS; an empty document (EOS right after EOS) is a single token.
    assert packed[1]["input_ids"].tolist() == [EOS, EOS, 3, 4, 5, 6]
    assert packed[1]["position_ids"].tolist() == [0, 0, 0, 1, 2, 3]


def test_works_on_a_memmap(tmp_path):
    path = tmp_path / "t.bin"
    np.arange(10, dtype=np.uint16).tofile(path)
    packed = PackedSequences(np.memmap(path, dtype=np.uint16, mode="r"), 4, EOS, True)
    assert packed[1]["input_ids"].tolist() == [4, 5, 6, 7]


def test_collate_stacks_int64_tensors():
    packed = PackedSequences(np.arange(1, 13, dtype=np.uint16), 4, EOS, True)
    batch = collate([packed[0], packed[2]])
    assert set(batch) == {"input_ids", "position_ids"}
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == (2, 4)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [9, 10, 11, 12]]


def test_loss_mask_windows_follow_the_token_windows():
    tokens = np.arange(1, 13, dtype=np.uint16)
    mask = np.array([0, 0, 1, 1, 1, 0, 1, 1, 0, 0, 0, 1], dtype=np.uint8)
    packed = PackedSequences(tokens, 4, EOS, document_mask=False, loss_mask=mask)
    assert list(packed[0]) == ["input_ids", "loss_mask"]
    assert packed[1]["loss_mask"].tolist() == [1, 0, 1, 1] and packed[1]["loss_mask"].dtype == np.int64
    batch = collate([packed[0], packed[2]])
    assert batch["loss_mask"].dtype == torch.int64 and batch["loss_mask"].tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]
    assert "loss_mask" not in PackedSequences(tokens, 4, EOS, False)[0]  # no mask given: no key
    with pytest.raises(ValueError, match="loss_mask"):
        PackedSequences(tokens, 4, EOS, False, loss_mask=mask[:-1])


def test_restarting_position_ids_keep_attention_inside_each_document():
    """The contract `packing: document` relies on: with no attention mask, HF turns restarting position
    ids into a block-diagonal causal mask. Only without a KV cache: the forward must pass use_cache=False."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    doc_a, doc_b = [5, 6, 7, 8, EOS], [9, 10, 11, 12, 13, EOS]
    batch = collate([PackedSequences(np.array(doc_a + doc_b), 11, EOS, document_mask=True)[0]])
    with torch.no_grad():
        packed = model(**batch, use_cache=False).logits[0, len(doc_a):]
        alone = model(input_ids=torch.tensor([doc_b]), use_cache=False).logits[0]
        crossing = model(input_ids=batch["input_ids"], use_cache=False).logits[0, len(doc_a):]
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(crossing, alone, atol=1e-3)  # plain concat packing does attend across

"""tunelab's preference losses against TRL's own trainers on the same tiny model and the same token ids.

The pairs go through TRL as text (a word-level tokenizer built here: word `wN` is token N), through the trainer's
own tokenization and collator (the test checks that they give back exactly the hand-made ids), and into its
`compute_loss`; tunelab gets the same ids as its batch source builds them (prompt + reply rows, loss mask on the
reply and its EOS, data/rows.py collate_pairs). Loss and the gradient of every policy weight must agree:

    dpo      DPOTrainer, loss_type="sigmoid", with a separate frozen reference model (perturbed, so ≠ policy);
             tunelab's DPO gets the reference through its cached-reference path (pair_logps -> DPO.reference)
    cDPO     tunelab's label_smoothing ε against DPOTrainer loss_type="aot" one pair per batch: TRL 1.16's
             "sigmoid" ignores label_smoothing, and its "robust" is rDPO (a different, unbiased estimator); "aot"
             is (1 - ε)(-log σ(βΔ)) + ε(-log σ(-βΔ)) after sorting Δ over the batch, which a one-pair batch
             leaves alone, so it is exactly conservative DPO
    simpo    trl.experimental CPOTrainer, loss_type="simpo", cpo_alpha=0 (no BC term); TRL's loss is
             -log σ(β((c̄ - r̄) - simpo_gamma/β)) = -log σ(β(c̄ - r̄) - simpo_gamma): simpo_gamma is tunelab's gamma
    orpo     trl.experimental ORPOTrainer, beta = tunelab's beta (λ). TRL's NLL term is a token mean over the
             whole batch of prompt AND reply tokens of the chosen rows; tunelab's is the mean over pairs of each
             chosen reply's per-token NLL. So the full loss is compared on pairs whose prompt is only BOS (no
             prompt token is a target) and whose chosen replies have one length (the two means coincide), and
             the odds-ratio term alone on the general pairs.

Skipped, with the reason, where trl is not installed. The models run in float64 on both sides, but TRL 1.16's
DPOTrainer scores tokens with its fused LM head in float32 (trl/kernels/chunked_logprob.py) and its ORPO casts
the log-probs to float32 before the odds ratio, so the tolerances are float32 rounding; gradients are compared
relative to each tensor's largest entry.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("trl", reason="trl is not installed: the comparison with TRL's preference losses needs it "
                                  "(pip install trl)")
datasets = pytest.importorskip("datasets", reason="trl's trainers need the datasets package")

from tunelab.data.rows import collate_pairs  # noqa: E402
from tunelab.eval.preference import pair_logps, sequence_logps  # noqa: E402
from tunelab.objectives.preference import DPO, ORPO, SimPO  # noqa: E402

# transformers 5 deprecations hit inside TRL's own code (is_gradient_checkpointing): not this test's business
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

PAD, BOS, EOS, UNK = 0, 1, 2, 3
VOCAB = 64

# (prompt, chosen reply, rejected reply) as token ids: every prompt starts with BOS (TRL's CPO/ORPO tokenization
# adds one otherwise) and every reply ends with EOS (TRL adds one otherwise). Lengths differ, so padding matters.
PAIRS = [
    ([BOS, 5, 6, 7], [8, 9, 10, EOS], [11, EOS]),
    ([BOS, 12], [13, 14, EOS], [15, 16, 17, 18, 19, EOS]),
    ([BOS, 20, 21, 22, 23, 24], [25, EOS], [26, 27, 28, EOS]),
    ([BOS, 29, 30], [31, 32, 33, 34, 35, EOS], [31, 32, 36, EOS]),
]
# For the full ORPO loss: prompt = BOS alone, the chosen replies of one length (see the module docstring).
ORPO_PAIRS = [
    ([BOS], [40, 41, 42, EOS], [43, EOS]),
    ([BOS], [44, 45, 46, EOS], [47, 48, 49, 50, 51, EOS]),
    ([BOS], [52, 53, 54, EOS], [55, 56, EOS]),
]

# Tolerances: float64 models; TRL scores DPO tokens in float32 and casts ORPO log-probs to float32 (docstring).
LOGP_TOL = dict(rtol=1e-6, atol=1e-5)  # summed log-probs of ~2-6 tokens, each about -4
LOSS_TOL = dict(rtol=1e-6, atol=1e-6)
GRAD_RTOL = 1e-5  # of each gradient tensor's largest entry (float32 rounding of ~1e-3 grads is ~1e-8 apart)


# ---------------------------------------------------------------- models, tokenizer, batches


def tiny_models():
    """(policy, reference): a seeded 2-layer Llama in float64, and a copy with perturbed weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False,
                         attn_implementation="eager")
    torch.manual_seed(0)
    policy = LlamaForCausalLM(config).to(torch.float64)
    with torch.no_grad():  # the random init is small; bigger weights make the model's preferences less flat
        for p in policy.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    reference = copy.deepcopy(policy)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.1 * p.abs().mean() * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    for model in (policy, reference):
        model.eval()  # no dropout on either side (TRL disables dropout too)
    reference.requires_grad_(False)
    return policy, reference


def word_tokenizer():
    """Word-level: "wN" is token N, with <pad> <s> </s> <unk> as 0-3."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": UNK, **{f"w{i}": i for i in range(4, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def words(ids):
    return " ".join("<s>" if i == BOS else "</s>" if i == EOS else f"w{i}" for i in ids)


def text_rows(pairs):
    """TRL's standard (non-conversational) preference rows; the replies keep their EOS in the text."""
    return datasets.Dataset.from_list([{"prompt": words(p), "chosen": " " + words(c), "rejected": " " + words(r)}
                                       for p, c, r in pairs])


def tunelab_batch(pairs):
    """The batch PreferenceBatches gives: prompt + reply rows, mask 1 on the reply, pair ids for the reference."""
    def doc(prompt, reply):
        return np.array(prompt + reply, dtype=np.int64), np.array([0] * len(prompt) + [1] * len(reply), dtype=np.int64)

    rows = [(doc(p, c), doc(p, r)) for p, c, r in pairs]
    batch = {k: torch.from_numpy(v) for k, v in collate_pairs(rows, PAD).items()}
    batch["pair_id"] = torch.arange(len(pairs))
    return batch


def grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_same_grads(ours, theirs):
    assert ours.keys() == theirs.keys()
    for name in ours:
        scale = float(theirs[name].abs().max())
        assert scale > 0, f"no gradient reached {name}"
        torch.testing.assert_close(ours[name], theirs[name].to(ours[name].dtype), rtol=GRAD_RTOL,
                                   atol=GRAD_RTOL * scale, msg=lambda why, name=name: f"gradient of {name}: {why}")


def trl_config(config_cls, tmp_path, **options):
    import dataclasses

    # TRL turns checkpointing on by default; transformers 5 renamed the option (the old name warns)
    names = {f.name for f in dataclasses.fields(config_cls)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return config_cls(output_dir=str(tmp_path / "trl"), report_to=[], bf16=False, fp16=False, use_cpu=True,
                      save_strategy="no", seed=0, **{checkpointing: False}, **options)


def quiet(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make()


# ---------------------------------------------------------------- DPO


def dpo_trainer(tmp_path, policy, reference, pairs, **options):
    from trl import DPOConfig, DPOTrainer

    args = trl_config(DPOConfig, tmp_path, beta=0.1, per_device_train_batch_size=len(pairs), **options)
    trainer = quiet(lambda: DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=text_rows(pairs),
                                       processing_class=word_tokenizer()))
    rows = [trainer.train_dataset[i] for i in range(len(pairs))]
    # TRL's own tokenization gives back the hand-made ids (its collator then builds prompt + reply rows).
    assert [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in rows] == [tuple(p) for p in pairs]
    return trainer, rows


def tunelab_dpo(policy, reference, pairs, **options):
    batch = tunelab_batch(pairs)
    method = DPO({"beta": 0.1, **options})
    method.reference = pair_logps(reference, batch)[0]  # the cached-reference path: [pair id, (chosen, rejected)]
    loss = method.loss(policy, batch)
    loss.backward()
    return loss.detach(), method.reference


def test_dpo_loss_and_gradients_match_trl(tmp_path):
    policy, reference = tiny_models()
    loss, table = tunelab_dpo(ours := copy.deepcopy(policy), reference, PAIRS)

    trainer, rows = dpo_trainer(tmp_path, theirs := copy.deepcopy(policy), copy.deepcopy(reference), PAIRS,
                                loss_type="sigmoid")
    inputs = trainer.data_collator(rows)
    # The log-probs first: TRL's reference forward (its fused LM head) against tunelab's pair_logps.
    trl_ref = torch.stack(trainer.compute_ref_log_probs(trainer.ref_model, inputs), dim=1)
    torch.testing.assert_close(table.double(), trl_ref.double(), **LOGP_TOL)
    trl_policy = torch.stack(trainer.compute_ref_log_probs(theirs, inputs), dim=1)
    torch.testing.assert_close(pair_logps(policy, tunelab_batch(PAIRS))[0].double(), trl_policy.double(), **LOGP_TOL)
    assert (trl_policy - trl_ref).abs().min() > 0.1  # the reference really differs from the policy

    trl_loss = trainer.compute_loss(theirs, inputs)
    trl_loss.backward()
    torch.testing.assert_close(loss.double(), trl_loss.detach().double(), **LOSS_TOL)
    assert_same_grads(grads(ours), grads(theirs))


def test_conservative_dpo_matches_trl(tmp_path):
    """label_smoothing 0.1 (cDPO) against TRL's "aot" on one-pair batches (module docstring)."""
    policy, reference = tiny_models()
    loss, _ = tunelab_dpo(ours := copy.deepcopy(policy), reference, PAIRS, label_smoothing=0.1)

    trainer, rows = dpo_trainer(tmp_path, theirs := copy.deepcopy(policy), copy.deepcopy(reference), PAIRS,
                                loss_type="aot", label_smoothing=0.1)
    trl_loss = 0.0
    for row in rows:  # tunelab's loss is the mean over pairs: so is this sum of one-pair losses / pairs
        pair_loss = trainer.compute_loss(theirs, trainer.data_collator([row])) / len(rows)
        pair_loss.backward()
        trl_loss += pair_loss.detach()
    torch.testing.assert_close(loss.double(), trl_loss.double(), **LOSS_TOL)
    assert_same_grads(grads(ours), grads(theirs))
    # and label smoothing did change the loss (TRL's plain "sigmoid" would have ignored it)
    plain, _ = tunelab_dpo(copy.deepcopy(policy), reference, PAIRS)
    assert abs(float(plain) - float(loss)) > 1e-3


# ---------------------------------------------------------------- SimPO and ORPO (trl.experimental)


def experimental_trainer(kind, tmp_path, policy, pairs, **options):
    """CPOTrainer or ORPOTrainer on the pairs as text, and their collated batch (the trainer's own collator)."""
    def load():  # trl.experimental warns once on import that its APIs are unstable
        if kind == "cpo":
            from trl.experimental.cpo import CPOConfig, CPOTrainer
            return CPOConfig, CPOTrainer
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
        return ORPOConfig, ORPOTrainer

    try:
        Config, Trainer = quiet(load)
    except ImportError as err:
        pytest.skip(f"this trl has no trl.experimental.{kind} ({err})")
    args = trl_config(Config, tmp_path, per_device_train_batch_size=len(pairs), max_length=64,
                      remove_unused_columns=False, **options)
    trainer = quiet(lambda: Trainer(model=policy, args=args, train_dataset=text_rows(pairs),
                                    processing_class=word_tokenizer()))
    rows = [trainer.train_dataset[i] for i in range(len(pairs))]
    for row, (p, c, r) in zip(rows, pairs):  # TRL's tokenization gives back the hand-made ids
        assert (row["chosen_input_ids"], row["rejected_input_ids"]) == (p + c, p + r)
        assert row["chosen_labels"] == [-100] * len(p) + c and row["rejected_labels"] == [-100] * len(p) + r
    return trainer, trainer.data_collator(rows)


def test_simpo_matches_trl_cpo_simpo(tmp_path):
    policy, _ = tiny_models()
    beta, gamma = 2.0, 1.0
    loss = SimPO({"beta": beta, "gamma": gamma}).loss(ours := copy.deepcopy(policy), tunelab_batch(PAIRS))
    loss.backward()

    trainer, inputs = experimental_trainer("cpo", tmp_path, theirs := copy.deepcopy(policy), PAIRS,
                                           loss_type="simpo", beta=beta, simpo_gamma=gamma, cpo_alpha=0.0)
    trl_loss = trainer.compute_loss(theirs, inputs)
    trl_loss.backward()
    torch.testing.assert_close(loss.detach().double(), trl_loss.detach().double(), **LOSS_TOL)
    assert_same_grads(grads(ours), grads(theirs))


def test_orpo_matches_trl_where_the_nll_terms_coincide(tmp_path):
    policy, _ = tiny_models()
    loss = ORPO({"beta": 0.1}).loss(ours := copy.deepcopy(policy), tunelab_batch(ORPO_PAIRS))
    loss.backward()

    trainer, inputs = experimental_trainer("orpo", tmp_path, theirs := copy.deepcopy(policy), ORPO_PAIRS, beta=0.1)
    trl_loss = trainer.compute_loss(theirs, inputs)
    trl_loss.backward()
    torch.testing.assert_close(loss.detach().double(), trl_loss.detach().double(), **LOSS_TOL)
    assert_same_grads(grads(ours), grads(theirs))


def test_orpo_odds_ratio_term_matches_trl(tmp_path):
    """With real prompts the NLL terms differ by design; what remains after each side's own NLL must agree."""
    policy, _ = tiny_models()
    batch = tunelab_batch(PAIRS)
    ours = copy.deepcopy(policy)
    loss = ORPO({"beta": 0.1}).loss(ours, batch)
    logps, counts = sequence_logps(ours(input_ids=batch["input_ids"]).logits, batch["input_ids"], batch["loss_mask"])
    means = (logps / counts).view(2, -1)  # per-token mean log-prob of each reply: [chosen row, rejected row]
    nll = -means[0].mean()  # the module docstring's NLL term (same forward as the loss, so it cancels exactly)
    (loss - nll).backward()

    trainer, inputs = experimental_trainer("orpo", tmp_path, theirs := copy.deepcopy(policy), PAIRS, beta=0.1)
    mean_chosen, mean_rejected, *_ = trainer.concatenated_forward(theirs, inputs)  # per-token means of the replies
    torch.testing.assert_close(torch.stack([mean_chosen, mean_rejected]).detach().double(), means.detach().double(),
                               **LOGP_TOL)
    odds_ratio = -trainer.odds_ratio_loss(mean_chosen, mean_rejected)[0].mean()  # compute_loss: nll - losses.mean()
    odds_ratio.backward()
    torch.testing.assert_close((loss - nll).detach().double(), odds_ratio.detach().double(), **LOSS_TOL)
    assert_same_grads(grads(ours), grads(theirs))

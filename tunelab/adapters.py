"""What tunelab knows about HF peft adapters outside the methods that train them: their names in
messages, which ones prepend virtual tokens, and how a loaded PeftModel is made to compute what tunelab
reads. Below methods/ and models.py, which both use it (imports no torch or peft).
"""

from __future__ import annotations

# peft_type (adapter_config.json) -> how tunelab names it in messages
PEFT_LABELS = {"LORA": "LoRA", "ADALORA": "AdaLoRA", "IA3": "IA3", "LOHA": "LoHa", "LOKR": "LoKr", "VERA": "VeRA",
               "OFT": "OFT", "BOFT": "BOFT", "SHIRA": "SHiRA", "LN_TUNING": "LN tuning",
               "TRAINABLE_TOKENS": "trainable-tokens", "PREFIX_TUNING": "prefix-tuning",
               "PROMPT_TUNING": "prompt-tuning", "P_TUNING": "p-tuning", "FOURIERFT": "FourierFT", "HRA": "HRA",
               "VBLORA": "VB-LoRA", "RANDLORA": "RandLoRA", "C3A": "C3A", "MISS": "MiSS", "ROAD": "RoAd",
               "GRALORA": "GraLoRA", "DELORA": "DeLoRA", "WAVEFT": "WaveFT", "LILY": "Lily", "BEFT": "BEFT",
               "FROD": "FRoD", "PVERA": "PVeRA", "GLORA": "GLoRA", "HIRA": "HiRA", "TINYLORA": "TinyLoRA",
               "UNILORA": "UniLoRA", "PSOFT": "PSOFT", "PEANUT": "PEANuT", "SUPERTUNING": "SuperTuning",
               "DEFT": "DEFT", "OSF": "OSF"}
# Adapters whose virtual tokens are inputs, not weight deltas: nothing to merge.
PROMPT_LEARNING = {"PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "ADAPTION_PROMPT", "CPT"}


def _drop_position_ids(module, args, kwargs):
    # peft ignores position ids for prompt and p-tuning (with a warning on every call): drop them here.
    kwargs.pop("position_ids", None)
    return args, kwargs


def _trim_virtual_tokens(module, args, kwargs, output):
    # Prompt and p-tuning prepend virtual tokens to the input, and the logits cover them too; every
    # tunelab reader (evaluation, scoring) expects one logit row per input token, so drop theirs.
    ids = kwargs.get("input_ids", args[0] if args else None)
    n = module.active_peft_config.num_virtual_tokens
    logits = getattr(output, "logits", None)
    if ids is not None and logits is not None and logits.shape[1] == ids.shape[1] + n:
        output.logits = logits[:, n:]
    return output


def fit_for_tunelab(peft_model):
    """Make a PeftModel compute what tunelab's loop and evaluation expect (training and loading alike)."""
    if peft_model.active_peft_config.peft_type in ("PROMPT_TUNING", "P_TUNING"):
        peft_model.register_forward_pre_hook(_drop_position_ids, with_kwargs=True)
        peft_model.register_forward_hook(_trim_virtual_tokens, with_kwargs=True)
    return peft_model

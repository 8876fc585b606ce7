"""Registry of training methods (which weights train, and how they are saved): name -> "module:Class"
implementing the hooks in methods/base.py. What the loss is, is the objective's (tunelab/objectives/).

Adding a method = one module + one line here; the shared method suite in tests/unit/test_method_suite.py
then runs it.
"""

from __future__ import annotations

from tunelab.registry import create, registered_class

METHODS: dict[str, str] = {
    "full": "tunelab.methods.full:Full",
    "bitfit": "tunelab.methods.bitfit:BitFit",
    "lora": "tunelab.methods.lora:LoRA",
    "adalora": "tunelab.methods.peft_family:AdaLoRA",
    "ia3": "tunelab.methods.peft_family:IA3",
    "loha": "tunelab.methods.peft_family:LoHa",
    "lokr": "tunelab.methods.peft_family:LoKr",
    "vera": "tunelab.methods.peft_family:VeRA",
    "oft": "tunelab.methods.peft_family:OFT",
    "boft": "tunelab.methods.peft_family:BOFT",
    "shira": "tunelab.methods.peft_family:SHiRA",
    "ln_tuning": "tunelab.methods.peft_family:LNTuning",
    "trainable_tokens": "tunelab.methods.peft_family:TrainableTokens",
    "prompt_tuning": "tunelab.methods.peft_prompt:PromptTuning",
    "prefix_tuning": "tunelab.methods.peft_prompt:PrefixTuning",
    "p_tuning": "tunelab.methods.peft_prompt:PTuning",
    "peft": "tunelab.methods.peft_generic:Peft",  # the other peft methods, by type
    "masked": "tunelab.methods.masked:Masked",
    "lisa": "tunelab.methods.lisa:LISA",
    "hft": "tunelab.methods.hft:HFT",
    "mezo": "tunelab.methods.mezo:MeZO",
    "sparse": "tunelab.methods.sparse:SparseFT",
}


def method_class(name: str):
    return registered_class(METHODS, name, "method.name", "method")


def create_method(name: str, options: dict):
    return create(METHODS, name, options, "method")

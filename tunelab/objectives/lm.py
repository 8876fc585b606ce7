"""Language modelling: next-token prediction (clm) and masked-token prediction (mlm, BERT's 80/10/10)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from tunelab.errors import DataError
from tunelab.objectives.base import Objective


class CausalLM(Objective):
    name = "clm"


class MaskedLMOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mlm_probability: float = Field(0.15, gt=0, lt=1)
    whole_word_masking: bool = False  # mask every token of a chosen word together


class MaskedLM(Objective):
    name = "mlm"
    Options = MaskedLMOptions
    model_kind = "encoder"
    labels = "mlm"

    def chunked_loss_refusal(self):
        return "the masked-LM loss is the model's own (its head runs on the masked positions only)"

    def masking(self, tokenizer) -> dict:
        from tunelab.train.objectives import word_table

        if tokenizer.mask_token_id is None:
            raise DataError("objective mlm needs a tokenizer with a mask token: train one (unset tokenizer.path) "
                            "or use a BERT-style tokenizer")
        return {"mask_id": tokenizer.mask_token_id, "mlm_probability": self.options.mlm_probability,
                "vocab_size": len(tokenizer), "special_ids": list(tokenizer.all_special_ids),
                "word_table": word_table(tokenizer) if self.options.whole_word_masking else None}

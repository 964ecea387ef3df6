"""T5 and CLIP text encoders behind one interface: a list of prompts -> a tensor."""

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # importing transformers takes seconds: only for the annotations
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class HFEmbedder(nn.Module):
    """Wraps a `transformers` text encoder the way BFL uses it.

    T5 gives `last_hidden_state` (B, max_length, d_model); CLIP gives the pooled output (B, hidden).
    Prompts are padded to `max_length` and truncated, with no attention mask (BFL tokenization).
    """

    def __init__(
        self, tokenizer: "PreTrainedTokenizerBase", hf_module: "PreTrainedModel", max_length: int, is_clip: bool
    ):
        super().__init__()
        self.tokenizer = tokenizer
        self.hf_module = hf_module.eval().requires_grad_(False)
        self.max_length = max_length
        self.is_clip = is_clip
        self.output_key = "pooler_output" if is_clip else "last_hidden_state"

    @property
    def device(self) -> torch.device:
        return next(self.hf_module.parameters()).device

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, list[int]]:
        """Token ids (B, max_length) and, per prompt, how many tokens truncation dropped."""
        full = self.tokenizer(prompts, truncation=False, padding=False)["input_ids"]
        dropped = [max(0, len(ids) - self.max_length) for ids in full]
        batch = self.tokenizer(
            prompts, truncation=True, max_length=self.max_length, padding="max_length", return_tensors="pt"
        )
        return batch["input_ids"], dropped

    def tokenize_weighted(self, segments: list[tuple[str, float]]) -> tuple[Tensor, Tensor, int]:
        """T5 ids (1, max_length) for (text, weight) segments, per-token weights (1, max_length), tokens dropped."""
        ids, weights = [], []
        for text, weight in segments:
            # each segment is tokenized as its own words: surrounding spaces would become lone '▁' tokens
            if not text.strip():
                continue
            piece = self.tokenizer(text.strip(), add_special_tokens=False)["input_ids"]
            ids += piece
            weights += [weight] * len(piece)
        closing = self.tokenizer("", add_special_tokens=True)["input_ids"]  # T5: [</s>]
        room = self.max_length - len(closing)
        dropped = max(0, len(ids) - room)
        ids, weights = ids[:room] + closing, weights[:room] + [1.0] * len(closing)
        pad = self.max_length - len(ids)
        ids += [self.tokenizer.pad_token_id] * pad
        weights += [1.0] * pad
        return torch.tensor([ids]), torch.tensor([weights]), dropped

    @staticmethod
    def apply_weights(hidden: Tensor, weights: Tensor) -> Tensor:
        """Scale each token's vector by its weight, then restore the overall mean (A1111's normalisation)."""
        original_mean = hidden.float().mean()
        weighted = hidden.float() * weights.to(hidden.device)[..., None]
        return (weighted * (original_mean / weighted.mean())).to(hidden.dtype)

    @torch.inference_mode()
    def forward(self, input_ids: Tensor) -> Tensor:
        outputs = self.hf_module(input_ids=input_ids.to(self.device), attention_mask=None, output_hidden_states=False)
        return outputs[self.output_key]
